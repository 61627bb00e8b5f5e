"""Factorised attention as custom ops: `{backend}_attention_forward` and `{backend}_attention_backward`.

Every backend's kernels follow one contract:
- forward(q, k, v, frames, mode, scale) -> (out, lse): q, k, v (B, H, N, Dh) with any strides;
  out (B, H, N, Dh) as a view of a (B, N, H, Dh) buffer (the layout the output projection
  reads, so its reshape to (B, N, H * Dh) is free); lse (B, H, N), the natural-log log-sum-exp
  of each query's scaled logits, in float32 (float64 for float64 inputs).
- backward(grad_out, q, k, v, out, lse, frames, mode, scale) -> (dq, dk, dv), each a (B, H, N, Dh)
  view of a (B, N, H, Dh) buffer. Probabilities are recomputed from lse (FlashAttention-2), so
  autograd saves q, k, v, out and lse: O(N) per head, nothing N x L.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..checks import AttentionShape
from .library import define, register_autograd

FORWARD_SCHEMA = "(Tensor q, Tensor k, Tensor v, int frames, str mode, float scale) -> (Tensor, Tensor)"
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int frames, str mode, float scale)"
    " -> (Tensor, Tensor, Tensor)"
)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is kept in float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def projection_layout(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, N, Dh) view of a (B, N, H, Dh) buffer shaped like q."""
    B, H, N, Dh = q.shape
    return q.new_empty(B, N, H, Dh).transpose(1, 2)


@dataclass(frozen=True)
class AttentionOps:
    """One backend's attention ops, called with the dispatch signature."""

    forward: Any  # torch.ops.vivit_kernels.{backend}_attention_forward
    backward: Any

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
        out, _ = self.forward(q, k, v, shape.frames, shape.mode, shape.scale)
        return out


def _fake_forward(q, k, v, frames, mode, scale):
    return projection_layout(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, out, lse, frames, mode, scale):
    return projection_layout(q), projection_layout(q), projection_layout(q)


def _forward_flops(q_shape, k_shape, v_shape, frames, mode, scale, *args, out_shape=None, **kwargs) -> int:
    return AttentionShape.of(q_shape, frames, mode, scale).forward_flops


def _backward_flops(grad_shape, q_shape, k_shape, v_shape, o_shape, lse_shape, frames, mode, scale, *args,
                    out_shape=None, **kwargs) -> int:  # fmt: skip
    return AttentionShape.of(q_shape, frames, mode, scale).backward_flops


def define_attention_ops(backend: str, forward: Callable | None = None, backward: Callable | None = None) -> AttentionOps:
    """Declare `{backend}_attention_forward/backward`, differentiable, with fakes and FLOP formulas.

    `forward` / `backward` are the launchers (see the module docstring for their contract), or
    None when a compiled library registers the kernels.
    """
    forward_op = define(f"{backend}_attention_forward", FORWARD_SCHEMA, forward, _fake_forward, _forward_flops)
    backward_op = define(f"{backend}_attention_backward", BACKWARD_SCHEMA, backward, _fake_backward, _backward_flops)

    def setup_context(ctx, inputs, output):
        q, k, v, frames, mode, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grid = (frames, mode, scale)

    def differentiate(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, *ctx.grid)
        return dq, dk, dv, None, None, None

    register_autograd(forward_op, differentiate, setup_context)
    return AttentionOps(forward_op, backward_op)
