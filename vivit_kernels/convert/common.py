"""What every family's conversion shares: recognising classes, building the replacement attention,
packing projections, and the checks and refusals worded the same for every family."""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from ..attention import FactorisedAttention
from ..lean import plain_linear


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


class AdoptedAttention(FactorisedAttention):
    """FactorisedAttention on the parameters of the module it replaces, kept under their own names.

    The original's children (its projections, norms, dropouts) become this module's children, so
    `named_parameters()`, `state_dict()` and every tool that finds parameters or modules by name
    (optimiser groups, PEFT adapters, Hugging Face's loading reports, timm checkpoints) see the
    original's names, and an optimiser built before the conversion still holds them. A subclass
    says where the projections are: `qkv_parts`, the dotted names of the q, k, v Linears (their
    weights stacked when used; a missing bias among present ones is zero, as VideoMAE's key bias)
    or of one packed qkv Linear; `output_parts`, the modules applied in turn to the attention's
    output. A part that is no longer a plain Linear (wrapped by an adapter) is called, and its
    outputs are concatenated.
    """

    qkv_parts: tuple[str, ...] = ()
    output_parts: tuple[str, ...] = ()

    def part(self, name: str) -> nn.Module:
        """The submodule at the dotted `name` (get_submodule's lookup without its checks: this
        runs several times a call)."""
        module = self
        for attribute in name.split("."):
            module = module._modules[attribute]
        return module

    def qkv_linears(self) -> list[nn.Module]:
        return [self.part(name) for name in self.qkv_parts]

    @property
    def linear_qkv(self) -> bool:
        return all(plain_linear(linear) for linear in self.qkv_linears())

    def qkv_projection(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
        # The parts looked up once per call (each property looks them up again).
        linears = self.qkv_linears()
        if not all(plain_linear(linear) for linear in linears):
            return None
        return tuple(linear.weight for linear in linears), _stacked_bias(linears)

    def call_qkv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.part(name)(x) for name in self.qkv_parts], dim=-1)

    @property
    def dim(self) -> int:
        return self.part(self.qkv_parts[0]).in_features

    @property
    def qkv_weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(linear.weight for linear in self.qkv_linears())

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        return _stacked_bias(self.qkv_linears())

    def project(self, out: torch.Tensor) -> torch.Tensor:
        for name in self.output_parts:
            out = self.part(name)(out)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Converted layers of 0.1.0 saved their own names: `qkv` (the q, k, v parts stacked), `proj`,
        # and VideoMAE's `q_bias` / `v_bias`. Such entries are read into the parts they came from.
        for kind in ("weight", "bias"):
            stacked = state_dict.pop(f"{prefix}qkv.{kind}", None)
            if stacked is not None:
                for name, chunk in zip(self.qkv_parts, stacked.chunk(len(self.qkv_parts)), strict=True):
                    state_dict[f"{prefix}{name}.{kind}"] = chunk
            projection = state_dict.pop(f"{prefix}proj.{kind}", None)
            if projection is not None:
                name = self.output_parts[0]
                while isinstance(self.part(name), nn.Sequential):  # vit-pytorch's to_out: (Linear, Dropout)
                    name += ".0"
                state_dict[f"{prefix}{name}.{kind}"] = projection
        for old, index in (("q_bias", 0), ("v_bias", -1)):
            bias = state_dict.pop(f"{prefix}{old}", None)
            if bias is not None:
                state_dict[f"{prefix}{self.qkv_parts[index]}.bias"] = bias
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _stacked_bias(linears: list[nn.Module]) -> torch.Tensor | None:
    """The biases of stacked projections side by side, a missing one among present ones zero."""
    present = next((linear.bias for linear in linears if linear.bias is not None), None)
    if len(linears) == 1 or present is None:
        return present
    return torch.cat(
        [present.new_zeros(linear.out_features) if linear.bias is None else linear.bias for linear in linears]
    )


def adopting_attention(name: str, original: nn.Module, cls: type[AdoptedAttention], **kwargs) -> AdoptedAttention:
    """A `cls` for the layer `name` that takes over `original`'s children, in its training state; its
    own errors name the layer. Only modules without parameters of their own are taken over."""
    if any(True for _ in original.parameters(recurse=False)) or any(True for _ in original.buffers(recurse=False)):
        raise ValueError(f"convert: {name}: {type(original).__qualname__} holds tensors outside its submodules")
    try:
        module = cls(**kwargs, device="meta")  # its own projections are dropped below
    except ValueError as error:
        raise ValueError(f"convert: {name}: {error}") from error
    del module.qkv, module.proj, module.proj_drop
    for child_name, child in original.named_children():
        if hasattr(module, child_name):
            # A name this class uses (vit-pytorch's `attend` softmax): only a module holding no
            # tensors, which the fused attention does not call, may stay behind.
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                raise ValueError(f"convert: {name}: its submodule {child_name!r} clashes with FactorisedAttention's")
            continue
        module.add_module(child_name, child)
    return module.train(original.training)


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
