"""Tubelet embedding: non-overlapping t x h x w tubes of a clip, linearly projected to tokens."""

from __future__ import annotations

import torch
from torch import nn

from . import backends
from .checks import check_tubelet


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
    check_tubelet(video, weight, bias, pos_embed)
    request = backends.Request("tubelet", video.device, video.dtype)
    return backends.select(request, backend).run(video, weight, bias, pos_embed)


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
        t, h, w = self.tubelet
        return frames // t, height // h, width // w

    def forward(self, video: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """video: (B, C, T, H, W) -> tokens (B, nt, nh * nw, D), `pos_embed` added if given."""
        return tubelet_embedding(video, self.proj.weight, self.proj.bias, pos_embed, backend=self.backend)
