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

from ..checks import AttentionShape
from ..reference import grouped_attention, grouped_attention_packed
from .registry import Backend, OpSupport, register

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    """SDPA over (batch, H, L, Dh) groups, with the strides they come in (its kernels take any)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout_p, scale=shape.scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return grouped_attention(q, k, v, shape, functools.partial(_sdpa, shape=shape))


def attention_packed(qkv: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return grouped_attention_packed(qkv, shape, functools.partial(_sdpa, shape=shape))


register(
    Backend(
        name="sdpa",
        fused=False,  # "auto" falls back to it, with a warning, when no fused backend fits
        ops={
            "attention": OpSupport(attention, _DEVICES, _FLOATS, dropout=True),
            "attention_packed": OpSupport(attention_packed, _DEVICES, _FLOATS, dropout=True),
        },
    )
)
