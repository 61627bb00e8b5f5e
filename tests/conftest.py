"""Helpers shared by the tests: input builders, an error measure and the float64 oracle.

Without a GPU the Triton kernels run under Triton's interpreter, on CPU tensors: the library
decides that itself (`vivit_kernels.triton.interpreted`), so nothing here configures it.
"""

from __future__ import annotations

import pytest
import torch

from vivit_kernels.checks import MODES  # noqa: F401  (re-exported for the test modules)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def packed_qkv(B, H, N, Dh, *, dtype=torch.float64, device="cpu", generator=None, requires_grad=True):
    """q, k, v as (B, H, N, Dh) strided views of one packed (B, N, 3, H, Dh) projection, and the pack."""
    qkv = torch.randn(B, N, 3, H, Dh, dtype=dtype, device=device, generator=generator)
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, qkv


# Prefix tokens and token layouts: (P, T, S, layout). Grids not multiples of any block; T = 1 and
# S = 1 edge cases; P > 1 (register tokens) so prefix rows of several tokens are exercised.
PREFIX_CASES = [(1, 3, 7, "time_major"), (1, 5, 7, "space_major"), (3, 3, 10, "time_major"), (2, 4, 1, "space_major"),
                (1, 1, 12, "space_major"), (3, 5, 20, "space_major")]


def oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout, scale=None):
    """The oracle's output and its gradients w.r.t. q, k, v for `grad_out`, in float64."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, frames, mode, scale, prefix, layout)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out.double()))


def grid_coordinates(frames: int, spatial: int, layout: str = "time_major") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) of each grid token, in token order: time-major n = t * S + s, space-major n = s * T + t."""
    n = torch.arange(frames * spatial)
    if layout == "time_major":
        return n // spatial, n % spatial
    return n % frames, n // frames


def group_mask(frames: int, spatial: int, mode: str, prefix: int = 0, layout: str = "time_major") -> torch.Tensor:
    """(N, N) boolean: may grid-or-prefix token i attend to token j? Prefix queries of spatial
    heads attend frame by frame: their rows here allow the prefix only (see masked_attention)."""
    t, s = grid_coordinates(frames, spatial, layout)
    N = prefix + frames * spatial
    mask = torch.zeros(N, N, dtype=torch.bool)
    if mode == "joint":
        return mask | True
    mask[:prefix, :prefix] = True  # the prefix among itself
    if mode == "spatial":
        mask[prefix:, :prefix] = True  # grid tokens see the prefix
        mask[prefix:, prefix:] = t[:, None] == t[None, :]
    elif mode == "temporal":
        mask[prefix:, prefix:] = s[:, None] == s[None, :]
    else:
        raise ValueError(mode)
    return mask


def _masked_softmax_attention(q, k, v, mask, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask.to(q.device), float("-inf")).softmax(-1) @ v


def masked_attention(q, k, v, frames: int, mode: str, scale: float | None = None, prefix: int = 0,
                     layout: str = "time_major") -> torch.Tensor:  # fmt: skip
    """The independent oracle: dense N x N attention with each mode's mask, in float64. A spatial
    head's prefix queries attend to the prefix and frame f, for every f, and average the T results."""
    H, N, Dh = q.shape[1:]
    S = (N - prefix) // frames
    scale = Dh**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    modes = ["spatial"] * (H // 2) + ["temporal"] * (H - H // 2) if mode == "split" else [mode] * H
    heads = []
    for h, head_mode in enumerate(modes):
        qh, kh, vh = q[:, h], k[:, h], v[:, h]
        out = _masked_softmax_attention(qh, kh, vh, group_mask(frames, S, head_mode, prefix, layout), scale)
        if head_mode == "spatial" and prefix:
            t, _ = grid_coordinates(frames, S, layout)
            per_frame = []
            for f in range(frames):
                keys = torch.cat([torch.ones(prefix, dtype=torch.bool), t == f])
                per_frame.append(_masked_softmax_attention(qh[:, :prefix], kh, vh, keys[None, :].expand(prefix, -1), scale))
            out = torch.cat([torch.stack(per_frame).mean(0), out[:, prefix:]], dim=1)
        heads.append(out)
    return torch.stack(heads, dim=1)


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs that are reproducible when a test fails."""
    return torch.Generator().manual_seed(0)
