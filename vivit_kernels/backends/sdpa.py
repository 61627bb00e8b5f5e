"""The "sdpa" backend: torch's scaled_dot_product_attention on each mode's groups.

What "auto" runs where no fused kernel fits (half precision on CPU, attention dropout, head dims
the kernels do not take): SDPA, given every group as a batch row, with the copies that grouping
needs, as a user would write it. torch picks its flash / memory-efficient kernels where it has
them, so no score matrix is kept and half-precision logits are accumulated in float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange

from ..checks import AttentionShape
from ..ops.attention import packed_from
from ..reference import grouped_attention
from .registry import Backend, OpSupport, register

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """SDPA over (..., L, Dh): 4-D inputs as they are, (b, h, g, L, d) groups flattened into one
    (1, b*h*g, L, d) batch (4-D, as its kernels want)."""
    if q.dim() == 4:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout_p, scale=shape.scale)
    b, h = q.shape[:2]
    out = _sdpa(*(rearrange(x, "b h g l d -> 1 (b h g) l d") for x in (q, k, v)), shape)
    return rearrange(out, "1 (b h g) l d -> b h g l d", b=b, h=h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return grouped_attention(q, k, v, shape, functools.partial(_sdpa, shape=shape))


register(
    Backend(
        name="sdpa",
        fused=False,  # "auto" falls back to it, with a warning, when no fused backend fits
        ops={
            "attention": OpSupport(attention, _DEVICES, _FLOATS, dropout=True),
            "attention_packed": OpSupport(packed_from(attention), _DEVICES, _FLOATS, dropout=True),
        },
    )
)
