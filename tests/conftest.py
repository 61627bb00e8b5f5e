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


def group_mask(frames: int, spatial: int, mode: str) -> torch.Tensor:
    """(N, N) boolean: may token i attend to token j? Tokens are time-major, n = t * S + s."""
    n = torch.arange(frames * spatial)
    t, s = n // spatial, n % spatial
    if mode == "joint":
        return torch.ones(len(n), len(n), dtype=torch.bool)
    if mode == "spatial":
        return t[:, None] == t[None, :]
    if mode == "temporal":
        return s[:, None] == s[None, :]
    raise ValueError(mode)


def masked_attention(q, k, v, frames: int, mode: str, scale: float | None = None) -> torch.Tensor:
    """The independent oracle: dense N x N attention with each mode's mask, in float64."""
    H, N, Dh = q.shape[1:]
    scale = Dh**-0.5 if scale is None else scale
    if mode == "split":
        masks = [group_mask(frames, N // frames, "spatial")] * (H // 2)
        masks += [group_mask(frames, N // frames, "temporal")] * (H - H // 2)
        mask = torch.stack(masks)[None]  # (1, H, N, N)
    else:
        mask = group_mask(frames, N // frames, mode)
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs that are reproducible when a test fails."""
    return torch.Generator().manual_seed(0)
