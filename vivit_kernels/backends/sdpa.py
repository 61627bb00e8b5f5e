"""The "sdpa" backend: torch's scaled_dot_product_attention on each mode's groups.

What "auto" runs where no fused kernel fits (half precision on CPU, attention dropout, head dims
the kernels do not take): SDPA, given every group as a batch row, with the copies that grouping
needs, as a user would write it. torch picks its flash / memory-efficient kernels where it has
them, so no score matrix is kept and half-precision logits are accumulated in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..checks import AttentionShape
from ..ops.attention import packed_from
from ..reference import GRID
from .registry import Backend, OpSupport, register

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cpu", "cuda", "mps", "xpu", "meta")


def _sdpa(q, k, v, shape: AttentionShape) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=shape.dropout_p, scale=shape.scale)


def _batched(groups: list[torch.Tensor], shape: AttentionShape) -> torch.Tensor:
    """SDPA over (b, h, g, L, d) groups, flattened into one (1, b*h*g, L, d) batch (4-D, as its kernels want)."""
    b, h, g = groups[0].shape[:3]
    out = _sdpa(*(rearrange(x, "b h g l d -> 1 (b h g) l d") for x in groups), shape)
    return rearrange(out, "1 (b h g) l d -> b h g l d", b=b, h=h)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    if shape.mode == "joint":
        return _sdpa(q, k, v, shape)
    if shape.mode == "split":
        half = shape.heads // 2
        halves = []
        for heads, mode in ((slice(None, half), "spatial"), (slice(half, None), "temporal")):
            part = AttentionShape(**{**shape.__dict__, "heads": q[:, heads].shape[1], "mode": mode})
            halves.append(attention(q[:, heads], k[:, heads], v[:, heads], part))
        return torch.cat(halves, dim=1)
    P, T, grid = shape.prefix, shape.frames, GRID[shape.layout]
    prefix = [x[:, :, :P] for x in (q, k, v)]
    frames = [rearrange(x[:, :, P:], f"{grid} -> b h t s d", t=T) for x in (q, k, v)]
    if shape.mode == "spatial":
        groups = [torch.cat([p.unsqueeze(2).expand(-1, -1, T, -1, -1), f], dim=3) for p, f in zip(prefix, frames)]
        out = _batched(groups, shape)
        prefix_out, grid_out = out[:, :, :, :P].mean(dim=2), out[:, :, :, P:]
    else:
        grid_out = _batched([f.transpose(2, 3) for f in frames], shape).transpose(2, 3)
        prefix_out = _sdpa(*prefix, shape) if P else prefix[0]
    return torch.cat([prefix_out, rearrange(grid_out, f"b h t s d -> {grid}")], dim=2)


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
