"""Tubelet embedding as custom ops: `{backend}_tubelet_forward` and its three backward ops.

Every backend's kernels follow one contract (S' = nh * nw, P = nt * S' tokens per clip):
- forward(video, weight, bias, pos_embed) -> tokens (B, nt, S', D): video (B, C, T, H, W) with
  any strides, weight (D, C, t, h, w), bias (D,) or None, pos_embed (P, D) or None.
- backward_video(grad, video, weight) -> d(video), shaped and laid out like `torch.empty_like(video)`,
  zero where no whole tubelet reaches.
- backward_weight(grad, video, weight, bias_grad) -> [d(weight)] or [d(weight), d(bias)].
- backward_pos(grad) -> d(pos_embed) (P, D): the token gradient summed over the batch.
Autograd saves the video and the weight only (bias and pos_embed enter linearly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import TubeletShape
from .library import define, register_autocast, register_autograd

FORWARD_SCHEMA = "(Tensor video, Tensor weight, Tensor? bias, Tensor? pos_embed) -> Tensor"
BACKWARD_VIDEO_SCHEMA = "(Tensor grad, Tensor video, Tensor weight) -> Tensor"
BACKWARD_WEIGHT_SCHEMA = "(Tensor grad, Tensor video, Tensor weight, bool bias_grad) -> Tensor[]"
BACKWARD_POS_SCHEMA = "(Tensor grad) -> Tensor"


@dataclass(frozen=True)
class TubeletOps:
    """One backend's tubelet-embedding ops, called with the dispatch signature."""

    forward: Any  # torch.ops.vivit_kernels.{backend}_tubelet_forward
    backward_video: Any
    backward_weight: Any
    backward_pos: Any

    def __call__(
        self,
        video: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        pos_embed: torch.Tensor | None,
        shape: TubeletShape,
    ) -> torch.Tensor:
        if pos_embed is not None:  # any accepted layout -> (P, D); autograd reshapes the gradient back
            pos_embed = pos_embed.reshape(shape.tokens_per_clip, shape.dim)
        return self.forward(video, weight, bias, pos_embed)


def _shape(video_shape, weight_shape) -> TubeletShape:
    return TubeletShape.of(video_shape, weight_shape)


def _fake_forward(video, weight, bias, pos_embed):
    return video.new_empty(_shape(video.shape, weight.shape).output_shape)


def _fake_backward_video(grad, video, weight):
    return torch.empty_like(video)


def _fake_backward_weight(grad, video, weight, bias_grad):
    dweight = weight.new_empty(weight.shape)
    return [dweight, weight.new_empty(weight.shape[0])] if bias_grad else [dweight]


def _fake_backward_pos(grad):
    B, nt, S, D = grad.shape
    return grad.new_empty(nt * S, D)


def _forward_flops(video_shape, weight_shape, *args, **kwargs) -> int:
    return _shape(video_shape, weight_shape).flops


def _backward_flops(grad_shape, video_shape, weight_shape, *args, **kwargs) -> int:
    return _shape(video_shape, weight_shape).flops


def define_tubelet_ops(
    backend: str,
    forward: Callable | None = None,
    backward_video: Callable | None = None,
    backward_weight: Callable | None = None,
    backward_pos: Callable | None = None,
    autocast: dict[str, torch.dtype | None] | None = None,
) -> TubeletOps:
    """Declare `{backend}_tubelet_forward` and `_backward_{video,weight,pos}`, differentiable, with
    fakes and FLOP formulas. The launchers follow the module docstring's contract, or are None
    when a compiled library registers the kernels. `autocast` maps a device type to the dtype
    video, weight, bias and pos_embed are cast to inside its autocast regions (None: the
    region's, as for convolution)."""
    name = f"{backend}_tubelet"
    ops = TubeletOps(
        define(f"{name}_forward", FORWARD_SCHEMA, forward, _fake_forward, _forward_flops),
        define(f"{name}_backward_video", BACKWARD_VIDEO_SCHEMA, backward_video, _fake_backward_video, _backward_flops),
        define(
            f"{name}_backward_weight", BACKWARD_WEIGHT_SCHEMA, backward_weight, _fake_backward_weight, _backward_flops
        ),
        define(f"{name}_backward_pos", BACKWARD_POS_SCHEMA, backward_pos, _fake_backward_pos),
    )

    def setup_context(ctx, inputs, output):
        video, weight, bias, pos_embed = inputs
        ctx.save_for_backward(video, weight)
        ctx.has_bias, ctx.has_pos = bias is not None, pos_embed is not None

    def differentiate(ctx, grad):
        video, weight = ctx.saved_tensors
        need_video, need_weight, need_bias, need_pos = ctx.needs_input_grad
        dvideo = ops.backward_video(grad, video, weight) if need_video else None
        dweight = dbias = None
        bias_grad = ctx.has_bias and need_bias
        if need_weight or bias_grad:
            grads = ops.backward_weight(grad, video, weight, bias_grad)
            dweight = grads[0] if need_weight else None
            dbias = grads[1] if bias_grad else None
        dpos = ops.backward_pos(grad) if ctx.has_pos and need_pos else None
        return dvideo, dweight, dbias, dpos

    register_autograd(ops.forward, differentiate, setup_context)
    for device_type, dtype in (autocast or {}).items():
        register_autocast(ops.forward, device_type, dtype)
    return ops
