"""Factorised attention as custom ops: `{backend}_attention_forward` and `{backend}_attention_backward`.

Every backend's kernels follow one contract (`vivit_kernels.checks.AttentionShape` names the
sizes; G = frames, and (Ha, G) = `averaged_prefix`: the heads whose P prefix queries attend
frame by frame):
- forward(q, k, v, frames, prefix, layout, mode, scale) -> (out, lse, prefix_out, prefix_lse):
  q, k, v (B, H, N, Dh) with any strides; out (B, H, N, Dh) as a view of a (B, N, H, Dh) buffer
  (the layout the output projection reads, so its reshape to (B, N, H * Dh) is free); lse
  (B, H, N), the natural-log log-sum-exp of each query's scaled logits, in float32 (float64 for
  float64 inputs); prefix_out (B, Ha, G, P, Dh) and prefix_lse (B, Ha, G, P), each frame's
  output and log-sum-exp of those prefix queries (their rows of out hold the mean over frames;
  their rows of lse are unused), or empty (0,) tensors when no prefix query is averaged.
- backward(grad_out, q, k, v, out, lse, prefix_out, prefix_lse, frames, prefix, layout, mode,
  scale) -> (dq, dk, dv), each a (B, H, N, Dh) view of a (B, N, H, Dh) buffer. Probabilities are
  recomputed from the log-sum-exps (FlashAttention-2), so autograd saves q, k, v, out, lse and
  the per-frame prefix rows: O(N) per head, nothing N x L.
- packed_forward(qkv, heads, frames, ...) / packed_backward(grad_out, qkv, out, lse, prefix_out,
  prefix_lse, heads, frames, ...): the same on the packed projection a layer computes, qkv
  (B, N, 3 * H * Dh) with any strides (q, k, v read as views of it); out comes back as
  (B, N, H * Dh), the output projection's input, and the gradient as one (B, N, 3 * H * Dh)
  buffer the kernels write in place: no stack of three gradients, no accumulate copy into the
  projection's gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import AttentionShape
from .library import define, register_autocast, register_autograd

_GRID = "int frames, int prefix, str layout, str mode, float scale"
_SAVED = "Tensor out, Tensor lse, Tensor prefix_out, Tensor prefix_lse"
FORWARD_SCHEMA = f"(Tensor q, Tensor k, Tensor v, {_GRID}) -> (Tensor, Tensor, Tensor, Tensor)"
BACKWARD_SCHEMA = f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, {_SAVED}, {_GRID}) -> (Tensor, Tensor, Tensor)"
PACKED_FORWARD_SCHEMA = f"(Tensor qkv, int heads, {_GRID}) -> (Tensor, Tensor, Tensor, Tensor)"
PACKED_BACKWARD_SCHEMA = f"(Tensor grad_out, Tensor qkv, {_SAVED}, int heads, {_GRID}) -> Tensor"


def unpack_qkv(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, Dh) views of a (B, N, 3 * H * Dh) packed projection (no copy)."""
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * Dh) -> a (B, H, N, Dh) view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def packed_from(attention: Callable) -> Callable:
    """The packed-projection form of a q/k/v attention `(q, k, v, shape) -> (B, H, N, Dh)`, for
    backends without packed kernels: (qkv (B, N, 3 * H * Dh), shape) -> (B, N, H * Dh)."""
    return functools.partial(_attention_packed, attention)


def _attention_packed(attention: Callable, qkv: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return attention(*unpack_qkv(qkv, shape.heads), shape).transpose(1, 2).flatten(2)


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

    packed_forward: Any  # torch.ops.vivit_kernels.{backend}_attention_packed_forward
    packed_backward: Any

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
        out, *_ = self.forward(q, k, v, *grid_args(shape))
        return out

    def packed(self, qkv: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
        """(B, N, 3 * H * Dh) -> (B, N, H * Dh)."""
        out, *_ = self.packed_forward(qkv, shape.heads, *grid_args(shape))
        return out


def grid_args(shape: AttentionShape) -> tuple:
    """The ops' grid arguments (frames, prefix, layout, mode, scale) of a call."""
    return shape.frames, shape.prefix, shape.layout, shape.mode, shape.scale


def _shape(q_shape, frames, prefix, layout, mode, scale) -> AttentionShape:
    return AttentionShape.of(q_shape, frames, mode, scale, prefix=prefix, layout=layout)


def prefix_shapes(shape: AttentionShape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of prefix_out (B, Ha, G, P, Dh) and prefix_lse (B, Ha, G, P), or (0,) (0,)."""
    heads, groups = shape.averaged_prefix
    if not heads:
        return (0,), (0,)
    rows = (shape.batch, heads, groups, shape.prefix)
    return (*rows, shape.head_dim), rows


def prefix_buffers(q: torch.Tensor, frames: int, prefix: int, layout: str, mode: str, scale: float):
    """Uninitialised prefix_out and prefix_lse of a call."""
    out_shape, lse_shape = prefix_shapes(_shape(q.shape, frames, prefix, layout, mode, scale))
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=lse_dtype(q.dtype))


def _fake_forward(q, k, v, frames, prefix, layout, mode, scale):
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return (projection_layout(q), lse, *prefix_buffers(q, frames, prefix, layout, mode, scale))


def _fake_backward(grad_out, q, k, v, out, lse, prefix_out, prefix_lse, frames, prefix, layout, mode, scale):
    return projection_layout(q), projection_layout(q), projection_layout(q)


def _packed_shape(qkv_shape, heads: int) -> tuple[int, int, int, int]:
    B, N, width = qkv_shape
    return B, heads, N, width // (3 * heads)


def _fake_packed_forward(qkv, heads, frames, prefix, layout, mode, scale):
    B, H, N, Dh = _packed_shape(qkv.shape, heads)
    q = qkv.new_empty(B, H, N, Dh)
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return (qkv.new_empty(B, N, H * Dh), lse, *prefix_buffers(q, frames, prefix, layout, mode, scale))


def _fake_packed_backward(grad_out, qkv, out, lse, prefix_out, prefix_lse, heads, frames, prefix, layout, mode, scale):
    return qkv.new_empty(qkv.shape)


def _packed_forward_flops(
    qkv_shape, heads, frames, prefix, layout, mode, scale, *args, out_shape=None, **kwargs
) -> int:
    return _shape(_packed_shape(qkv_shape, heads), frames, prefix, layout, mode, scale).forward_flops


def _packed_backward_flops(
    grad_shape,
    qkv_shape,
    o_shape,
    lse_shape,
    po_shape,
    pl_shape,
    heads,
    frames,
    prefix,
    layout,
    mode,
    scale,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return _shape(_packed_shape(qkv_shape, heads), frames, prefix, layout, mode, scale).backward_flops


def _forward_flops(
    q_shape, k_shape, v_shape, frames, prefix, layout, mode, scale, *args, out_shape=None, **kwargs
) -> int:
    return _shape(q_shape, frames, prefix, layout, mode, scale).forward_flops


def _backward_flops(
    grad_shape,
    q_shape,
    k_shape,
    v_shape,
    o_shape,
    lse_shape,
    po_shape,
    pl_shape,
    frames,
    prefix,
    layout,
    mode,
    scale,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    return _shape(q_shape, frames, prefix, layout, mode, scale).backward_flops


def define_attention_ops(
    backend: str,
    forward: Callable | None = None,
    backward: Callable | None = None,
    packed_forward: Callable | None = None,
    packed_backward: Callable | None = None,
    autocast: dict[str, torch.dtype | None] | None = None,
    autograd: bool = True,
) -> AttentionOps:
    """Declare `{backend}_attention_forward/backward` and `_attention_packed_forward/backward`,
    differentiable, with fakes and FLOP formulas.

    The launchers follow the module docstring's contract, or are None when a compiled library
    registers the kernels. `autocast` maps a device type to the dtype the inputs are cast to
    inside its autocast regions (None: the region's, as for SDPA). `autograd` False: the compiled
    library registers the forward ops' autograd too (csrc/autograd.cpp), by the rule below.
    """
    name = f"{backend}_attention"
    forward_op = define(f"{name}_forward", FORWARD_SCHEMA, forward, _fake_forward, _forward_flops)
    backward_op = define(f"{name}_backward", BACKWARD_SCHEMA, backward, _fake_backward, _backward_flops)
    packed_forward_op = define(
        f"{name}_packed_forward", PACKED_FORWARD_SCHEMA, packed_forward, _fake_packed_forward, _packed_forward_flops
    )
    packed_backward_op = define(
        f"{name}_packed_backward",
        PACKED_BACKWARD_SCHEMA,
        packed_backward,
        _fake_packed_backward,
        _packed_backward_flops,
    )

    def setup_context(ctx, inputs, output):
        *tensors, frames, prefix, layout, mode, scale = inputs
        ctx.save_for_backward(*tensors, *output)
        ctx.grid = (frames, prefix, layout, mode, scale)

    def differentiate(ctx, grad_out, *_grad_statistics):
        dq, dk, dv = backward_op(grad_out, *ctx.saved_tensors, *ctx.grid)
        return dq, dk, dv, None, None, None, None, None

    def packed_setup_context(ctx, inputs, output):
        qkv, heads, *grid = inputs
        ctx.save_for_backward(qkv, *output)
        ctx.heads, ctx.grid = heads, grid

    def packed_differentiate(ctx, grad_out, *_grad_statistics):
        return (
            packed_backward_op(grad_out, *ctx.saved_tensors, ctx.heads, *ctx.grid),
            None,
            None,
            None,
            None,
            None,
            None,
        )

    if autograd:
        register_autograd(forward_op, differentiate, setup_context)
        register_autograd(packed_forward_op, packed_differentiate, packed_setup_context)
    for device_type, dtype in (autocast or {}).items():
        register_autocast(forward_op, device_type, dtype)
        register_autocast(packed_forward_op, device_type, dtype)
    return AttentionOps(forward_op, backward_op, packed_forward_op, packed_backward_op)
