"""Argument checks at the API boundary.

Every public op validates its inputs here, before any backend runs, so a bad call fails
with a message naming the argument, what it got and what was expected, never inside a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MODES = ("joint", "spatial", "temporal", "split")


@dataclass(frozen=True)
class AttentionShape:
    """The token grid of one `factorised_attention` call: N = frames * spatial tokens."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    frames: int
    spatial: int


@dataclass(frozen=True)
class TubeletShape:
    """The geometry of one `tubelet_embedding` call: (B, C, T, H, W) video -> (B, nt, nh * nw, D) tokens."""

    batch: int
    channels: int
    dim: int
    tubelet: tuple[int, int, int]
    grid: tuple[int, int, int]  # (nt, nh, nw) = floor((T, H, W) / tubelet)

    @property
    def tokens(self) -> tuple[int, int]:
        nt, nh, nw = self.grid
        return nt, nh * nw


def _check_tensor(op: str, name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")


def _check_same(op: str, named: dict[str, torch.Tensor | None]) -> None:
    """All given tensors share dtype and device with the first."""
    present = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; expected one dtype")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; expected one device")


def _check_positive_int(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")


def check_mode(op: str, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {', '.join(map(repr, MODES))}")


def check_attention(q, k, v, frames, mode, scale, dropout_p: float = 0.0) -> AttentionShape:
    op = "factorised_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, x, 4, "(B, H, N, Dh)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"{op}: q, k, v must have one shape (B, H, N, Dh), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_same(op, {"q": q, "k": k, "v": v})
    check_mode(op, mode)
    _check_positive_int(op, "frames", frames)
    B, H, N, Dh = q.shape
    if N == 0 or Dh == 0 or B == 0:
        raise ValueError(f"{op}: q has an empty dimension, shape {tuple(q.shape)}; expected B, N, Dh >= 1")
    if N % frames:
        raise ValueError(
            f"{op}: N={N} tokens is not divisible by frames={frames}; expected N = frames * spatial tokens"
        )
    if mode == "split" and H % 2:
        raise ValueError(f"{op}: mode 'split' needs an even number of heads (half spatial, half temporal), got H={H}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    return AttentionShape(B, H, N, Dh, frames, N // frames)


def check_tubelet(video, weight, bias, pos_embed) -> TubeletShape:
    op = "tubelet_embedding"
    _check_tensor(op, "video", video, 5, "(B, C, T, H, W)")
    _check_tensor(op, "weight", weight, 5, "(D, C, t, h, w) like nn.Conv3d")
    _check_same(op, {"video": video, "weight": weight, "bias": bias, "pos_embed": pos_embed})
    B, C, T, H, W = video.shape
    D, Cw, t, h, w = weight.shape
    if Cw != C:
        raise ValueError(f"{op}: weight has {Cw} input channels but video has C={C}; expected weight (D, {C}, t, h, w)")
    if min(weight.shape) < 1 or B < 1 or C < 1:
        raise ValueError(f"{op}: empty dimension in video {tuple(video.shape)} or weight {tuple(weight.shape)}")
    for axis, size, tube in (("T", T, t), ("H", H, h), ("W", W, w)):
        if size < tube:
            raise ValueError(
                f"{op}: video {axis}={size} is smaller than the tubelet's {tube} along it; "
                f"expected at least one tubelet (video {tuple(video.shape)}, tubelet {(t, h, w)})"
            )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (D,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{op}: bias must have shape ({D},) to match weight, got {got}")
    shape = TubeletShape(B, C, D, (t, h, w), (T // t, H // h, W // w))
    if pos_embed is not None:
        nt, ns = shape.tokens
        allowed = [(nt, ns, D), (1, nt, ns, D), (nt * ns, D), (1, nt * ns, D)]
        if not isinstance(pos_embed, torch.Tensor) or tuple(pos_embed.shape) not in allowed:
            got = tuple(pos_embed.shape) if isinstance(pos_embed, torch.Tensor) else type(pos_embed).__name__
            raise ValueError(
                f"{op}: pos_embed has shape {got}; expected one of {', '.join(map(str, allowed))} "
                f"for a {nt} x {ns} token grid of dim {D}"
            )
    return shape
