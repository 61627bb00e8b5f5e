"""Tubelet embedding: non-overlapping t x h x w tubes of a clip, linearly projected to tokens."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from . import backends
from .checks import TubeletShape, check_tubelet, check_video, tubelet_grid
from .ops.library import autocast_inputs


def tubelet_embedding(
    video: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """`F.conv3d(video, weight, bias, stride=(t, h, w))` as time-major tokens, plus `pos_embed`.

    Args:
        video: (B, C, T, H, W), any strides (a (B, T, C, H, W) decoder output permuted to this
            view is read without a copy by the fused backends).
        weight: (D, C, t, h, w), laid out as nn.Conv3d's weight.
        bias: (D,) or None.
        pos_embed: None, or a positional embedding added to the tokens: (nt, S', D),
            (1, nt, S', D), (nt * S', D) or (1, nt * S', D).
        backend: "auto", "reference", or another registered backend.

    Returns:
        (B, nt, S', D) with nt = T // t and S' = (H // h) * (W // w): like Conv3d, trailing
        frames, rows and columns that do not fill a whole tubelet are dropped.
    """
    selected, shape, (video, weight, bias, pos_embed) = _dispatch(video, weight, bias, pos_embed, backend)
    return selected.run(video, weight, bias, pos_embed, shape)


def tubelet_backend(*args, **kwargs) -> str:
    """The name of the backend `tubelet_embedding(*args, **kwargs)` runs on; nothing is computed."""
    call = inspect.signature(tubelet_embedding).bind(*args, **kwargs)
    call.apply_defaults()
    return _dispatch(**call.arguments)[0].name


def _dispatch(video, weight, bias, pos_embed, backend) -> tuple[backends.Selected, TubeletShape, tuple]:
    if isinstance(video, torch.Tensor):  # autocast casts as for nn.Conv3d, before a backend is chosen for the dtype
        video, weight, bias, pos_embed = autocast_inputs((video, weight, bias, pos_embed), video.device.type)
    shape = check_tubelet(video, weight, bias, pos_embed)
    selected = backends.select(backends.Request("tubelet", video.device, video.dtype, shape), backend)
    return selected, shape, (video, weight, bias, pos_embed)


def _triple(value: int | tuple[int, int, int], name: str) -> tuple[int, int, int]:
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in triple):
        raise ValueError(f"TubeletEmbedding: {name} must be a positive int or a (t, h, w) triple, got {value!r}")
    return triple


class TubeletEmbedding(nn.Module):
    """Clip -> tokens by tubelet embedding (ViViT section 3.3).

    Args:
        in_chans: channels C of the clip.
        dim: token width D.
        tubelet: (t, h, w) tube size, or one int for all three; t = 1 embeds each frame with
            2D patches (the uniform-frame-sampling tokeniser).
        bias: learn a bias.
        backend: backend for the op ("auto" picks the fastest that fits).

    The parameters live in `proj`, an nn.Conv3d, so Conv3d / timm `patch_embed.proj`
    weights load with the usual names.
    """

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 768,
        tubelet: int | tuple[int, int, int] = (2, 16, 16),
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.tubelet = _triple(tubelet, "tubelet")
        self.backend = backend
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=self.tubelet, stride=self.tubelet, bias=bias)

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(nt, nh, nw): the token grid of a (frames, height, width) clip."""
        return tubelet_grid((frames, height, width), self.tubelet)

    def forward(self, video: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """video: (B, C, T, H, W) -> tokens (B, nt, nh * nw, D), `pos_embed` added if given."""
        return tubelet_embedding(video, self.proj.weight, self.proj.bias, pos_embed, backend=self.backend)


def uniform_frame_indices(
    clip_frames: int, num_frames: int, *, jitter: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of `num_frames` frames sampled uniformly from a clip of `clip_frames` frames.

    The clip is cut into `num_frames` equal segments; evaluation takes each segment's centre
    (deterministic), training (`jitter=True`) a uniformly random frame inside each segment.
    A clip shorter than `num_frames` repeats frames. Returns a sorted int64 tensor.
    """
    for name, value in (("clip_frames", clip_frames), ("num_frames", num_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"uniform_frame_indices: {name} must be a positive int, got {value!r}")
    segment = clip_frames / num_frames
    offsets = (
        torch.rand(num_frames, generator=generator, dtype=torch.float64) if jitter else torch.full((num_frames,), 0.5)
    )
    positions = (torch.arange(num_frames, dtype=torch.float64) + offsets) * segment
    return positions.floor().long().clamp(0, clip_frames - 1)


class UniformFrameEmbedding(TubeletEmbedding):
    """Uniform frame sampling (ViViT section 3.3): `num_frames` frames sampled from the clip,
    each embedded with ViT's 2D patches (a tubelet embedding with t = 1).

    Args:
        in_chans: channels C of the clip.
        dim: token width D.
        patch_size: (h, w) patch, or one int for both.
        num_frames: n_t, frames sampled from each clip: centred in eval, jittered in training.
        bias: learn a bias.
        backend: backend for the op.
    """

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 768,
        patch_size: int | tuple[int, int] = 16,
        num_frames: int = 8,
        bias: bool = True,
        backend: str = "auto",
    ) -> None:
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        super().__init__(in_chans, dim, (1, *patch), bias=bias, backend=backend)
        self.num_frames = num_frames

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        _, nh, nw = super().grid(frames, height, width)
        return self.num_frames, nh, nw

    def forward(self, video: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """video: (B, C, T, H, W) with any T -> tokens (B, num_frames, nh * nw, D)."""
        check_video(type(self).__name__, video)
        indices = uniform_frame_indices(video.shape[2], self.num_frames, jitter=self.training)
        return super().forward(video.index_select(2, indices.to(video.device)), pos_embed)
