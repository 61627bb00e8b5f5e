"""What every family's conversion shares: recognising classes, building the replacement attention,
packing projections, and the checks and refusals worded the same for every family."""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..attention import FactorisedAttention


def class_in(module: str, name: str) -> type | None:
    """`module.name` if that module has been imported; else None (no object can be an instance of it)."""
    return getattr(sys.modules.get(module), name, None)


def is_instance_of(obj: object, module: str, name: str) -> bool:
    cls = class_in(module, name)
    return cls is not None and isinstance(obj, cls)


def dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def attention_like(name: str, like: nn.Module, cls: type = FactorisedAttention, **kwargs) -> FactorisedAttention:
    """A `cls` for the layer `name`, in `like`'s training state, on its device and in its dtype;
    its own errors name the layer."""
    weight = next(like.parameters(), None)
    if weight is not None:
        kwargs.update(device=weight.device, dtype=weight.dtype)
    try:
        module = cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"convert: {name}: {error}") from error
    return module.train(like.training)


def packed_linear(*linears: nn.Linear, bias: bool = True) -> nn.Linear:
    """One Linear computing the given ones side by side (q, k, v -> qkv), with copies of their
    weights, and of their biases unless bias=False."""
    first = linears[0]
    has_bias = bias and first.bias is not None
    packed = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        packed.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if has_bias:
            packed.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return packed.requires_grad_(first.weight.requires_grad)


def check_no_mode(family: str, mode: str | None, allowed: tuple = (None,)) -> None:
    if mode not in allowed:
        raise ValueError(
            f"convert: {family} keeps its own attention pattern, so mode must be "
            f"{' or '.join(map(repr, allowed))}, got {mode!r}"
        )


def check_no_grid(
    family: str,
    frames: int | None,
    tokens_per_frame: int | None,
    why: str = "attends jointly over its whole sequence, so frames / tokens_per_frame have no meaning there",
) -> None:
    if frames is not None or tokens_per_frame is not None:
        raise ValueError(f"convert: {family} {why} (got frames={frames}, tokens_per_frame={tokens_per_frame})")


def refuse_extras(layer: str, *, mask=None, output_attentions: bool = False) -> None:
    """Refuse call options a converted layer cannot honour: a mask where the layer attends in a
    factorised mode (joint layers take theirs through `layer_mask`), and attention weights."""
    if mask is not None:
        raise ValueError(
            f"{layer} (converted by vivit_kernels): an attention mask is not supported in a factorised mode "
            "(spatial / temporal); the mode is the mask"
        )
    if output_attentions:
        raise ValueError(
            f"{layer} (converted by vivit_kernels): output_attentions=True is not supported; the fused attention "
            "never forms the attention matrix"
        )


def layer_mask(layer: str, mask) -> torch.Tensor | None:
    """A family's attention mask as `FactorisedAttention.forward` takes it: a 2-D (B, N) key
    padding mask (vit-pytorch's; bool, or integer with nonzero attending) as (B, 1, 1, N); a
    3-D or 4-D mask (Hugging Face's mask helpers, timm's) as it is; FactorisedAttention checks it."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{layer} (converted by vivit_kernels): an attention mask of type {type(mask).__name__} is not supported; "
            "pass a bool or additive float tensor (transformers: attn_implementation 'sdpa' or 'eager')"
        )
    if mask.dim() != 2:
        return mask
    mask = mask[:, None, None, :]
    return mask if mask.dtype == torch.bool or mask.is_floating_point() else mask != 0


def refuse_recorded_attentions(model: nn.Module, layer: str) -> None:
    """Refuse output_attentions on a transformers model that records attention weights with hooks
    on its attention class (5.x `capture_outputs`): requested as it reads the request, by the
    forward's output_attentions, else by `model.config.output_attentions` at call time."""
    model.register_forward_pre_hook(functools.partial(_refuse_output_attentions, layer), with_kwargs=True)


def _refuse_output_attentions(layer: str, model: nn.Module, args: tuple, kwargs: dict) -> None:
    requested = kwargs.get("output_attentions", getattr(model.config, "output_attentions", False))
    refuse_extras(layer, output_attentions=requested)


# Joint attention ignores the grid: the whole sequence is one frame.
JOINT = dict(mode="joint", frames=1)


def scale_or_default(scale: float, head_dim: int) -> float | None:
    """None (our default, head_dim ** -0.5) unless the layer's scale differs."""
    return None if scale == head_dim**-0.5 else scale


def joint_attentions(model, family: str, module: str, class_name: str, mode, frames, tokens_per_frame) -> list:
    """(name, layer, layer.attention) for every layer of `model` whose `attention` is `module.class_name`,
    a joint attention (so mode may be None or "joint", and no grid is given); at least one."""
    check_no_mode(family, mode, (None, "joint"))
    check_no_grid(family, frames, tokens_per_frame)
    cls = class_in(module, class_name)
    found = [
        (f"{name}.attention", layer, layer.attention)
        for name, layer in model.named_modules()
        if type(getattr(layer, "attention", None)) is cls
    ]
    if not found:
        raise ValueError(f"convert: found no {class_name} to convert in {type(model).__qualname__} (converted twice?)")
    return found
