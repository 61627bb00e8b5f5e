"""Building blocks for transformer blocks that keep less for backward: recompute what is cheap.

A pre-norm block (x -> x + attn(LN(x)) -> y + MLP(LN(y))) keeps, per token, about 16 D-wide
tensors for backward: each LayerNorm's input and output, qkv, the attention output, the MLP's
4D hidden before and after GELU. Recomputing the LayerNorms and the GELU in backward (elementwise,
memory-bound: a few percent of the block's time) and keeping the matrix products' outputs leaves
10: the block input, qkv (3), the attention output, the residual, the MLP hidden (4)
(FlashAttention's fused MLP checkpoint levels and Megatron's selective recomputation make the
same trade). Both functions here compute what `linear(norm(x))` / `linear(gelu(h))` compute,
autocast included, and keep only their input:

    qkv = norm_linear(x, block.norm1, attn.qkv_weights, attn.qkv_bias)  # attn.project_qkv(x, block.norm1)
    x = x + attn.attend(qkv, frames)                  # FactorisedAttention after its projection
    h = norm_linear(x, block.norm2, mlp.fc1.weight, mlp.fc1.bias)
    x = x + gelu_linear(h, mlp.fc2.weight, mlp.fc2.bias)
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_choice


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer computes in here: the autocast region's, else x's."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


_NOTHING = contextlib.nullcontext()


def _no_autocast(device_type: str):
    """Autocast off where it is on (a no-op context otherwise: building an autocast context on
    every call costs microseconds a small layer notices)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NOTHING


def _linear_backward(grad, inputs, weight, bias_dtype, needs):
    """(d(inputs), d(weight), d(bias)) of y = inputs @ weight^T + bias, computed in grad's dtype (as
    autocast's backward does), the parameters' gradients in their dtypes; None where not needed."""
    needs_inputs, needs_weight, needs_bias = needs
    flat_grad, flat_inputs = grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1])
    d_inputs = grad @ weight.to(grad.dtype) if needs_inputs else None
    d_weight = (flat_grad.t() @ flat_inputs).to(weight.dtype) if needs_weight else None
    d_bias = flat_grad.sum(0).to(bias_dtype) if needs_bias else None
    return d_inputs, d_weight, d_bias


def _split(d_weight: torch.Tensor | None, weights: tuple, needs: tuple) -> tuple:
    """The gradients of stacked weights: d_weight's rows split as the weights stack, where needed."""
    parts = d_weight.split([w.shape[0] for w in weights]) if d_weight is not None else (None,) * len(weights)
    return tuple(part if need else None for part, need in zip(parts, needs, strict=True))


class _NormLinear(torch.autograd.Function):
    # The weights come last, as the parts stacked along dim 0 (one for a single Linear): they are
    # saved as they are and stacked again in backward, so a stack is never kept.
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, bias, *weights):
        dtype = _compute_dtype(x)
        with _no_autocast(x.device.type):
            # LayerNorm in its input's precision (autocast runs it in fp32), the product in `dtype`.
            normed = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
            out = F.linear(normed.to(dtype), _stack(weights).to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, norm_weight, norm_bias, *weights)
        ctx.eps, ctx.dtype, ctx.bias_dtype = eps, dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, *weights = ctx.saved_tensors
        needs_x, needs_nw, needs_nb, _, needs_b, *needs_w = ctx.needs_input_grad
        with torch.enable_grad(), _no_autocast(x.device.type):
            leaves = [
                t.detach().requires_grad_(need) if t is not None else None
                for t, need in ((x, needs_x), (norm_weight, needs_nw), (norm_bias, needs_nb))
            ]
            normed = F.layer_norm(leaves[0], x.shape[-1:], leaves[1], leaves[2], ctx.eps)
        d_normed, d_weight, d_bias = _linear_backward(
            grad,
            normed.detach().to(ctx.dtype),
            _stack(weights),
            ctx.bias_dtype,
            (True, any(needs_w), needs_b and ctx.bias_dtype),
        )
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        found = iter(torch.autograd.grad(normed, wanted, d_normed.to(normed.dtype)) if wanted else ())
        d_x, d_nw, d_nb = (next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves)
        return d_x, d_nw, d_nb, None, d_bias, *_split(d_weight, weights, needs_w)


class _StackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, *weights):
        dtype = _compute_dtype(x)
        with _no_autocast(x.device.type):
            out = F.linear(x.to(dtype), _stack(weights).to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x, *weights)
        ctx.dtype, ctx.bias_dtype = dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        needs_x, needs_b, *needs_w = ctx.needs_input_grad
        d_x, d_weight, d_bias = _linear_backward(
            grad, x.to(ctx.dtype), _stack(weights), ctx.bias_dtype, (needs_x, any(needs_w), needs_b and ctx.bias_dtype)
        )
        return d_x, d_bias, *_split(d_weight, weights, needs_w)


def _stack(weights: tuple) -> torch.Tensor:
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def _parts(weight: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    return (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)


def plain_linear(module: nn.Module) -> bool:
    """Whether the fused products may read `module`'s weight and bias: an nn.Linear itself, not a
    module around one (an adapter's layer adds to its output, so it must be called as it is)."""
    return type(module) is nn.Linear


def stacked_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, torch.cat(weights), bias)` keeping the weights for backward, not their stack
    (separate q, k, v projections computed as one product, saving no 3 D x D copy)."""
    weights = _parts(weights)
    if len(weights) == 1:
        return F.linear(x, weights[0], bias)
    return _StackedLinear.apply(x, bias, *weights)


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, approximate, weight, bias):
        dtype = _compute_dtype(hidden)
        with _no_autocast(hidden.device.type):
            activated = F.gelu(hidden, approximate=approximate).to(dtype)
            out = F.linear(activated, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(hidden, weight)
        ctx.approximate, ctx.dtype, ctx.bias_dtype = approximate, dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        needs_hidden, _, needs_w, needs_b = ctx.needs_input_grad
        activated = F.gelu(hidden, approximate=ctx.approximate).to(ctx.dtype)
        d_activated, d_weight, d_bias = _linear_backward(
            grad, activated, weight, ctx.bias_dtype, (needs_hidden, needs_w, needs_b and ctx.bias_dtype)
        )
        d_hidden = None
        if needs_hidden:
            d_hidden = torch.ops.aten.gelu_backward(d_activated.to(hidden.dtype), hidden, approximate=ctx.approximate)
        return d_hidden, None, d_weight, d_bias


def norm_linear(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    weight: torch.Tensor | Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear(norm(x), weight, bias)` keeping x for backward, not norm(x) (recomputed there).

    Args:
        x: (..., D).
        norm: a LayerNorm over D (with or without affine parameters).
        weight, bias: the linear layer's, (out, D) and (out,) or None; weight may be a sequence of
            weights stacked along dim 0 (as `stacked_linear`), kept as they are, not stacked.
    """
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise TypeError(f"norm_linear: norm must be an nn.LayerNorm over the last dim, got {norm!r}")
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, bias, *_parts(weight))


def gelu_linear(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """`F.linear(F.gelu(hidden, approximate=approximate), weight, bias)` keeping hidden for backward,
    not gelu(hidden) (recomputed there). approximate: "none" (exact) or "tanh"."""
    check_choice("gelu_linear", "approximate", approximate, ("none", "tanh"))
    return _GeluLinear.apply(hidden, approximate, weight, bias)
