"""Clip transforms: resize, crop, flip, normalise. Clips are (C, T, H, W) float tensors.

Randomness comes from an explicit torch.Generator, so an augmentation is a pure function of
the generator's seed (reproducible across workers, processes and resumed runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_MEAN = (0.5, 0.5, 0.5)  # ViT / ViViT (Inception-style) normalisation to [-1, 1]
IMAGE_STD = (0.5, 0.5, 0.5)


def to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (T, H, W, C) from a decoder -> float (C, T, H, W) in [0, 1]."""
    return frames.permute(3, 0, 1, 2).float().div_(255.0)


def resize_short_side(clip: torch.Tensor, size: int) -> torch.Tensor:
    """(C, T, H, W) -> (C, T, H', W') with min(H', W') == size, aspect ratio kept (bilinear, antialiased)."""
    C, T, H, W = clip.shape
    scale = size / min(H, W)
    out_hw = (max(size, round(H * scale)), max(size, round(W * scale)))
    if out_hw == (H, W):
        return clip
    frames = clip.permute(1, 0, 2, 3)  # (T, C, H, W): interpolate treats T as the batch
    frames = F.interpolate(frames, size=out_hw, mode="bilinear", align_corners=False, antialias=True)
    return frames.permute(1, 0, 2, 3)


def crop(clip: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return clip[:, :, top : top + size, left : left + size]


def random_crop(clip: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    H, W = clip.shape[-2:]
    top = int(torch.randint(H - size + 1, (1,), generator=generator))
    left = int(torch.randint(W - size + 1, (1,), generator=generator))
    return crop(clip, top, left, size)


def spatial_crops(clip: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    """`count` size x size crops spread evenly along the long side (3: start, centre, end, as in
    the multi-view evaluation of ViViT); centred on the short side. count = 1 is the centre crop."""
    H, W = clip.shape[-2:]
    if count == 1:
        return [crop(clip, (H - size) // 2, (W - size) // 2, size)]
    crops = []
    for i in range(count):
        if W >= H:
            crops.append(crop(clip, (H - size) // 2, round(i * (W - size) / (count - 1)), size))
        else:
            crops.append(crop(clip, round(i * (H - size) / (count - 1)), (W - size) // 2, size))
    return crops


def normalise(clip: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=clip.dtype).view(-1, 1, 1, 1)
    std = torch.as_tensor(std, dtype=clip.dtype).view(-1, 1, 1, 1)
    return (clip - mean) / std


def train_transform(
    frames: torch.Tensor, size: int, generator: torch.Generator, *, mean=IMAGE_MEAN, std=IMAGE_STD,
    scale: tuple[float, float] = (1.0, 1.25), flip: bool = True,
) -> torch.Tensor:
    """uint8 (T, H, W, C) -> normalised (C, T, size, size): short side resized to a random
    size in [scale[0] * size, scale[1] * size], random crop, random horizontal flip."""
    short = round(size * float(torch.empty(1, dtype=torch.float64).uniform_(*scale, generator=generator)))
    clip = random_crop(resize_short_side(to_float(frames), max(short, size)), size, generator)
    if flip and bool(torch.rand(1, generator=generator) < 0.5):
        clip = clip.flip(-1)
    return normalise(clip, mean, std)


def eval_transform(frames: torch.Tensor, size: int, crops: int = 1, *, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """uint8 (T, H, W, C) -> normalised (crops, C, T, size, size): short side resized to `size`,
    then `crops` crops along the long side."""
    clip = resize_short_side(to_float(frames), size)
    return torch.stack([normalise(c, mean, std) for c in spatial_crops(clip, size, crops)])
