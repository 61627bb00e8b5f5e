"""Clip transforms: resize, crop, flip, normalise.

Decoded frames, uint8 (T, H, W, C), are resized and cropped as uint8 (T, C, H, W) views in
channels-last layout, where torch's antialiased bilinear resize has a fast path (about 15x the
float32 one on one core, within one uint8 step of it); only the crop becomes a normalised float
clip (C, T, size, size).

Randomness comes from an explicit torch.Generator, so an augmentation is a pure function of
the generator's seed (reproducible across workers, processes and resumed runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_MEAN = (0.5, 0.5, 0.5)  # ViT / ViViT (Inception-style) normalisation to [-1, 1]
IMAGE_STD = (0.5, 0.5, 0.5)


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, C, H, W) -> (T, C, H', W') with min(H', W') == size, aspect ratio kept (bilinear, antialiased)."""
    T, C, H, W = frames.shape
    scale = size / min(H, W)
    out_hw = (max(size, round(H * scale)), max(size, round(W * scale)))
    if out_hw == (H, W):
        return frames
    return F.interpolate(frames, size=out_hw, mode="bilinear", align_corners=False, antialias=True)


def crop(frames: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return frames[..., top : top + size, left : left + size]


def random_crop(frames: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    H, W = frames.shape[-2:]
    top = int(torch.randint(H - size + 1, (1,), generator=generator))
    left = int(torch.randint(W - size + 1, (1,), generator=generator))
    return crop(frames, top, left, size)


def spatial_crops(frames: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """`count` size x size crops spread evenly along the long side (3: start, centre, end, as in
    the multi-view evaluation of ViViT); centred on the short side. count = 1 is the centre crop."""
    H, W = frames.shape[-2:]
    if count == 1:
        return [crop(frames, (H - size) // 2, (W - size) // 2, size)]
    crops = []
    for i in range(count):
        if W >= H:
            crops.append(crop(frames, (H - size) // 2, round(i * (W - size) / (count - 1)), size))
        else:
            crops.append(crop(frames, round(i * (H - size) / (count - 1)), (W - size) // 2, size))
    return crops


def normalise(frames: torch.Tensor, mean, std, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (T, C, H, W) -> float (C, T, H, W): (x / 255 - mean) / std, written into one float
    tensor (`out` when given)."""
    T, C, H, W = frames.shape
    scale = 1.0 / (255.0 * torch.as_tensor(std, dtype=torch.float32))
    shift = -torch.as_tensor(mean, dtype=torch.float32) / torch.as_tensor(std, dtype=torch.float32)
    clip = (torch.empty(C, T, H, W) if out is None else out).copy_(frames.permute(1, 0, 2, 3))
    return clip.mul_(scale.view(-1, 1, 1, 1)).add_(shift.view(-1, 1, 1, 1))


def _channels_first(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype != torch.uint8 or frames.dim() != 4:
        raise TypeError(f"transforms: expected uint8 frames (T, H, W, C), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2)  # a view: channels-last memory, the resize's fast layout


def train_transform(
    frames: torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    mean=IMAGE_MEAN,
    std=IMAGE_STD,
    scale: tuple[float, float] = (1.0, 1.25),
    flip: bool = True,
) -> torch.Tensor:
    """uint8 (T, H, W, C) -> normalised (C, T, size, size): short side resized to a random
    size in [scale[0] * size, scale[1] * size], random crop, random horizontal flip."""
    short = round(size * float(torch.empty(1, dtype=torch.float64).uniform_(*scale, generator=generator)))
    clip = random_crop(resize_short_side(_channels_first(frames), max(short, size)), size, generator)
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        clip = clip.flip(-1)
    return normalise(clip, mean, std)


def eval_transform(frames: torch.Tensor, size: int, crops: int = 1, *, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """uint8 (T, H, W, C) -> normalised (crops, C, T, size, size): short side resized to `size`,
    then `crops` crops along the long side."""
    resized = resize_short_side(_channels_first(frames), size)
    out = torch.empty(crops, frames.shape[-1], frames.shape[0], size, size)
    for k, view in enumerate(spatial_crops(resized, size, crops)):
        normalise(view, mean, std, out=out[k])
    return out
