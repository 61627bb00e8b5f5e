"""`convert`: put FactorisedAttention into the transformers people already have, in place.

One section per family: timm `VisionTransformer`; Hugging Face `TimesformerModel`, `VivitModel`,
`VideoMAEModel` (and their task models); vit-pytorch `ViViT`. A model is recognised through the
classes of packages it was built with (looked up in `sys.modules`), so vivit_kernels never
imports timm, transformers or vit_pytorch itself.

Each section checks every layer before it replaces any: a model that cannot be converted is left
as it was and the error names the layer and why. Where the original's parameter layout is ours
(a packed qkv projection, an output projection) its modules are reused, so an optimiser built
before the conversion still holds the parameters; separate q/k/v projections are packed into new
parameters. Converted layers have the state-dict names of `FactorisedAttention` (`qkv`, `proj`):
load a checkpoint into the original, then convert.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
from torch import nn

from . import backends
from .attention import FactorisedAttention
from .checks import MODES, check_choice, check_positive_int


def convert(
    model: nn.Module,
    *,
    mode: str | None = None,
    frames: int | None = None,
    tokens_per_frame: int | None = None,
    backend: str = "auto",
) -> nn.Module:
    """Replace the attention of `model` by `FactorisedAttention`, in place; returns `model`.

    Args:
        model: a timm `VisionTransformer`; a transformers `TimesformerModel`, `VivitModel` or
            `VideoMAEModel`, or a task model built on one (`...ForVideoClassification`,
            `VideoMAEForPreTraining`); a vit-pytorch `ViViT`.
        mode: timm (an image model, so required): "joint" keeps its function; "spatial",
            "temporal", "split" attend over the frames of a (B, P + T * S, D) token sequence,
            time-major, with the model's class and register tokens as the P prefix tokens.
            Video models keep their own attention: None (or "joint" for ViViT / VideoMAE).
        frames: timm: T, when the module should insist on one clip length. TimeSformer: T
            (default: `config.num_frames`, as the original layer assumes).
        tokens_per_frame: timm: S (default: the patch grid; required with dynamic_img_size
            unless frames is given). TimeSformer: S, so T is read off each input instead.
        backend: the attention backend of every converted layer ("auto", "cpu", "triton",
            "sdpa", "reference").

    What each family becomes:
        timm VisionTransformer: every block's `Attention` (qk_norm, proj_bias=False and
            attn_head_dim included; its q_norm / k_norm modules are reused).
        TimesformerModel, divided_space_time: each layer runs temporal and then spatial
            FactorisedAttention on the whole (B, 1 + S * T, D) sequence, space-major, the class
            token as one prefix token (it skips the temporal branch; spatially it attends once per
            frame and its outputs are averaged), instead of copying tokens into per-frame and
            per-position batches. space_only / joint_space_time: joint attention.
        VivitModel, VideoMAEModel: joint attention (VideoMAE: a query and value bias and a key
            bias that is a zero buffer, never trained).
        vit-pytorch ViViT: "factorized_encoder": joint attention in both transformers;
            "factorized_self_attention": spatial and temporal attention on the (B, T, n, D)
            grid, without the per-layer rearranges.

    Raises:
        TypeError: the model is of no family above.
        ValueError: an argument does not fit the family, or a layer cannot be converted
            (the message names it and why).
    """
    check_choice("convert", "mode", mode, (*MODES, None))
    for name, value in (("frames", frames), ("tokens_per_frame", tokens_per_frame)):
        if value is not None:
            check_positive_int("convert", name, value)
    check_choice("convert", "backend", backend, ("auto", *backends.names()))
    options = dict(mode=mode, frames=frames, tokens_per_frame=tokens_per_frame, backend=backend)
    for recognises, convert_family in _FAMILIES:
        if recognises(model):
            replacements = convert_family(model, **options)
            for parent, attribute, module in replacements:
                setattr(parent, attribute, module)
            return model
    raise TypeError(
        f"convert: {type(model).__module__}.{type(model).__qualname__} is not a model convert knows; it takes timm "
        "VisionTransformer, transformers TimesformerModel / VivitModel / VideoMAEModel (and the task models built on "
        "them) and vit-pytorch ViViT"
    )


# ----------------------------------------------------------------------------------- helpers


def _class(module: str, name: str) -> type | None:
    """`module.name` if that module has been imported; else None (no object can be an instance of it)."""
    return getattr(sys.modules.get(module), name, None)


def _is(obj: object, module: str, name: str) -> bool:
    cls = _class(module, name)
    return cls is not None and isinstance(obj, cls)


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def _attention(name: str, like: nn.Module, cls: type = FactorisedAttention, **kwargs) -> FactorisedAttention:
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


def _packed_linear(*linears: nn.Linear, bias: bool = True) -> nn.Linear:
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


def _no_mode(family: str, mode: str | None, allowed: tuple = (None,)) -> None:
    if mode not in allowed:
        raise ValueError(
            f"convert: {family} keeps its own attention pattern, so mode must be "
            f"{' or '.join(map(repr, allowed))}, got {mode!r}"
        )


def _no_grid(
    family: str,
    frames: int | None,
    tokens_per_frame: int | None,
    why: str = "attends jointly over its whole sequence, so frames / tokens_per_frame have no meaning there",
) -> None:
    if frames is not None or tokens_per_frame is not None:
        raise ValueError(f"convert: {family} {why} (got frames={frames}, tokens_per_frame={tokens_per_frame})")


def _unsupported_extras(layer: str, *, mask=None, output_attentions: bool = False) -> None:
    """Refuse call options a converted layer cannot honour."""
    if mask is not None:
        raise ValueError(
            f"{layer} (converted by vivit_kernels): an attention mask is not supported; the mode is the mask"
        )
    if output_attentions:
        raise ValueError(
            f"{layer} (converted by vivit_kernels): output_attentions=True is not supported; the fused attention "
            "never forms the attention matrix"
        )


# Joint attention ignores the grid: the whole sequence is one frame.
_JOINT = dict(mode="joint", frames=1)


def _scale(scale: float, head_dim: int) -> float | None:
    """None (our default, head_dim ** -0.5) unless the layer's scale differs."""
    return None if scale == head_dim**-0.5 else scale


def _joint_attentions(model, family: str, module: str, class_name: str, mode, frames, tokens_per_frame) -> list:
    """(name, layer, layer.attention) for every layer of `model` whose `attention` is `module.class_name`,
    a joint attention (so mode may be None or "joint", and no grid is given); at least one."""
    _no_mode(family, mode, (None, "joint"))
    _no_grid(family, frames, tokens_per_frame)
    cls = _class(module, class_name)
    found = [
        (f"{name}.attention", layer, layer.attention)
        for name, layer in model.named_modules()
        if type(getattr(layer, "attention", None)) is cls
    ]
    if not found:
        raise ValueError(f"convert: found no {class_name} to convert in {type(model).__qualname__} (converted twice?)")
    return found


# -------------------------------------------------------------------------------- timm ViT


def _is_timm_vit(model: nn.Module) -> bool:
    return _is(model, "timm.models.vision_transformer", "VisionTransformer")


def _convert_timm(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a timm VisionTransformer"
    if mode is None:
        raise ValueError(
            f"convert: {family} is an image model, so mode is required: 'joint' keeps its function; 'spatial', "
            "'temporal' or 'split' attend over the frames of a time-major token sequence"
        )
    timm_attention = _class("timm.models.vision_transformer", "Attention")
    if mode == "joint":
        _no_grid(f"{family} with mode='joint'", frames, tokens_per_frame)
        grid = dict(_JOINT)
    else:
        if tokens_per_frame is None and not getattr(model, "dynamic_img_size", False):
            grid_size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
            tokens_per_frame = None if grid_size is None else math.prod(grid_size)
        if tokens_per_frame is None and frames is None:
            raise ValueError(
                f"convert: {family} whose patch grid varies with the input (dynamic_img_size, or no "
                "patch_embed.grid_size) needs frames=T or tokens_per_frame=S"
            )
        grid = dict(
            mode=mode, frames=frames, tokens_per_frame=tokens_per_frame, num_prefix_tokens=model.num_prefix_tokens
        )
    replacements = []
    for i, block in enumerate(model.blocks):
        name = f"blocks.{i}.attn"
        attn = getattr(block, "attn", None)
        if isinstance(attn, FactorisedAttention):
            raise ValueError(f"convert: {name} is already a FactorisedAttention (converted twice?)")
        if type(attn) is not timm_attention:
            got = "no `attn`" if attn is None else f"{type(attn).__module__}.{type(attn).__qualname__}"
            raise ValueError(
                f"convert: {name}: {type(block).__qualname__} has {got}; only timm's Attention is converted "
                "(another attention class computes another function)"
            )
        norm = getattr(attn, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise ValueError(
                f"convert: {name}: scale_norm=True normalises the attention output before the projection, "
                "which FactorisedAttention does not do"
            )
        if getattr(attn, "gate", None) is not None:
            raise ValueError(f"convert: {name}: gated=True (a sigmoid gate on the attention output) is not supported")
        dim = attn.qkv.in_features
        if attn.proj.out_features != dim:
            raise ValueError(
                f"convert: {name}: dim_out={attn.proj.out_features} differs from dim={dim}; FactorisedAttention "
                "keeps the token width"
            )
        new = _attention(name, attn, dim=dim, num_heads=attn.num_heads, head_dim=attn.head_dim, backend=backend, **grid)
        # timm's fused path uses SDPA's default scale, head_dim ** -0.5, which is ours.
        for module in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"):
            setattr(new, module, getattr(attn, module))
        replacements.append((block, "attn", new))
    return replacements


# ------------------------------------------------------------------- transformers TimeSformer


_TIMESFORMER = "transformers.models.timesformer.modeling_timesformer"


def _is_timesformer(model: nn.Module) -> bool:
    return _is(getattr(model, "base_model", None), _TIMESFORMER, "TimesformerModel")


def _timesformer_attention(name: str, attention: nn.Module, cls: type, backend: str, **grid) -> FactorisedAttention:
    """FactorisedAttention from a `TimeSformerAttention` (packed qkv + output dense), reusing its modules."""
    inner = attention.attention
    dim = inner.qkv.in_features
    new = _attention(
        name,
        attention,
        cls,
        dim=dim,
        num_heads=inner.num_heads,
        attn_drop=_dropout_p(inner.attn_drop),
        backend=backend,
        **grid,
    )
    new.qkv, new.proj, new.proj_drop = inner.qkv, attention.output.dense, attention.output.dropout
    return new


def _convert_timesformer(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a TimeSformer"
    _no_mode(family, mode)
    layer_class = _class(_TIMESFORMER, "TimesformerLayer")
    replacements = []
    for name, layer in model.named_modules():
        if type(layer) is not layer_class:
            continue
        if layer.attention_type == "divided_space_time":
            config = layer.config
            # The original layer assumes config.num_frames; with tokens_per_frame, T is read off each input.
            grid = dict(
                frames=config.num_frames if frames is None and tokens_per_frame is None else frames,
                tokens_per_frame=tokens_per_frame,
                num_prefix_tokens=1,
                layout="space_major",
            )
            layer_class_new = _timesformer_divided_layer(layer_class)
            temporal = _timesformer_attention(
                f"{name}.temporal_attention",
                layer.temporal_attention,
                FactorisedAttention,
                backend,
                mode="temporal",
                **grid,
            )
            spatial = _timesformer_attention(
                f"{name}.attention", layer.attention, FactorisedAttention, backend, mode="spatial", **grid
            )
            replacements += [
                (layer, "temporal_attention", temporal),
                (layer, "attention", spatial),
                (layer, "__class__", layer_class_new),
            ]
        else:  # space_only, joint_space_time: one attention over the layer's whole input
            _no_grid(f"{family} with attention_type={layer.attention_type!r}", frames, tokens_per_frame)
            new = _timesformer_attention(
                f"{name}.attention", layer.attention, _TimesformerJointAttention, backend, **_JOINT
            )
            replacements.append((layer, "attention", new))
    if not replacements:
        raise ValueError(
            f"convert: found no TimesformerLayer to convert in {type(model).__qualname__} (converted twice?)"
        )
    return replacements


class _TimesformerJointAttention(FactorisedAttention):
    """As transformers' TimeSformerAttention: (hidden_states, output_attentions) -> (output,)."""

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor]:
        _unsupported_extras("TimeSformerAttention", output_attentions=output_attentions)
        return (super().forward(hidden_states),)


def _group_drop_mask(like: torch.Tensor, drop_prob: float, mask_shape: tuple) -> torch.Tensor:
    """Stochastic depth with one draw per group: a mask of `mask_shape` (broadcast over the groups'
    tensor `like`), each entry 0 or 1 / keep."""
    keep = 1.0 - drop_prob
    return torch.empty(mask_shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)


@functools.cache
def _timesformer_divided_layer(base: type) -> type:
    """A subclass of the installed `TimesformerLayer` whose forward runs FactorisedAttention on the
    whole sequence. Made on first use (transformers is imported only by its users); being a
    subclass keeps transformers' gradient checkpointing of the layer."""

    class TimesformerDividedLayer(base):
        """A TimesformerLayer (divided_space_time) on FactorisedAttention.

        `temporal_attention` and `attention` are FactorisedAttention (temporal, then spatial),
        space-major with the class token as the prefix: no token is copied into per-frame or
        per-position batches. Drop path is drawn per (sample, position) for the temporal residual
        and per (sample, frame) for the spatial one, as the original's batches draw it. One
        difference, in training only: the class token's spatial output is averaged over frames
        before its dropout and drop path (the original drops each frame's copy, then averages),
        so their noise on that token has the same mean and is drawn once.
        """

        def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor]:
            _unsupported_extras("TimesformerLayer", output_attentions=output_attentions)
            B, N, D = hidden_states.shape
            T = self.temporal_attention.grid_frames(N)
            S = (N - 1) // T
            drop_prob = getattr(self.drop_path, "drop_prob", 0.0) if self.training else 0.0

            # Temporal: the class token's row (it attends only to itself) is dropped: it skips this branch.
            temporal = self.temporal_attention(self.temporal_layernorm(hidden_states))[:, 1:]
            if drop_prob:
                position_mask = _group_drop_mask(temporal, drop_prob, (B, S, 1, 1))
                temporal = (temporal.view(B, S, T, D) * position_mask).view(B, S * T, D)
            patches = hidden_states[:, 1:] + self.temporal_dense(temporal)
            hidden_states = torch.cat((hidden_states[:, :1], patches), 1)

            # Spatial: the class token attends within every frame; its T outputs come back averaged.
            spatial = self.attention(self.layernorm_before(hidden_states))
            if drop_prob:
                frame_mask = _group_drop_mask(spatial, drop_prob, (B, 1, T, 1))
                spatial = torch.cat(
                    (
                        spatial[:, :1] * frame_mask.mean(2),
                        (spatial[:, 1:].view(B, S, T, D) * frame_mask).view(B, S * T, D),
                    ),
                    1,
                )
            hidden_states = hidden_states + spatial

            layer_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
            return (hidden_states + self.drop_path(layer_output),)

    # Named as a module attribute (see __getattr__ below), so pickle finds the class.
    TimesformerDividedLayer.__module__ = __name__
    TimesformerDividedLayer.__qualname__ = "TimesformerDividedLayer"
    return TimesformerDividedLayer


def __getattr__(name: str):
    if name == "TimesformerDividedLayer":
        from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

        return _timesformer_divided_layer(TimesformerLayer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------- transformers ViViT


_VIVIT = "transformers.models.vivit.modeling_vivit"


def _is_hf_vivit(model: nn.Module) -> bool:
    return _is(getattr(model, "base_model", None), _VIVIT, "VivitModel")


class _VivitAttention(FactorisedAttention):
    """As transformers' VivitAttention: (hidden_states, attention_mask, **kwargs) -> (output, weights=None)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        _unsupported_extras("VivitAttention", mask=attention_mask, output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states), None


def _convert_hf_vivit(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attn in _joint_attentions(
        model, "a ViViT (transformers)", _VIVIT, "VivitAttention", mode, frames, tokens_per_frame
    ):
        new = _attention(
            name,
            attn,
            _VivitAttention,
            dim=attn.q_proj.in_features,
            num_heads=attn.num_attention_heads,
            head_dim=attn.head_dim,
            attn_drop=attn.attention_dropout,
            scale=_scale(attn.scaling, attn.head_dim),
            backend=backend,
            **_JOINT,
        )
        new.qkv, new.proj = _packed_linear(attn.q_proj, attn.k_proj, attn.v_proj), attn.o_proj
        replacements.append((layer, "attention", new))
    return replacements


# -------------------------------------------------------------------- transformers VideoMAE


_VIDEOMAE = "transformers.models.videomae.modeling_videomae"


def _is_videomae(model: nn.Module) -> bool:
    return _is(getattr(model, "base_model", None), _VIDEOMAE, "VideoMAEModel")


class _VideoMAEAttention(FactorisedAttention):
    """As transformers 5's VideoMAEAttention (self-attention and output dense): (hidden_states, **kwargs) -> output."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        _unsupported_extras("VideoMAEAttention", output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states)


def _convert_videomae(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attention in _joint_attentions(
        model, "a VideoMAE", _VIDEOMAE, "VideoMAEAttention", mode, frames, tokens_per_frame
    ):
        inner = attention.attention
        biased = inner.query.bias is not None
        # VideoMAE has no key bias; ours is then a zero buffer (key_bias=False), never trained.
        new = _attention(
            name,
            attention,
            _VideoMAEAttention,
            dim=inner.query.in_features,
            num_heads=inner.num_attention_heads,
            head_dim=inner.attention_head_size,
            qkv_bias=biased,
            key_bias=False,
            attn_drop=inner.dropout_prob,
            scale=_scale(inner.scaling, inner.attention_head_size),
            backend=backend,
            **_JOINT,
        )
        new.qkv = _packed_linear(inner.query, inner.key, inner.value, bias=False)
        if biased:
            new.q_bias = nn.Parameter(inner.query.bias.detach().clone(), requires_grad=inner.query.bias.requires_grad)
            new.v_bias = nn.Parameter(inner.value.bias.detach().clone(), requires_grad=inner.value.bias.requires_grad)
            new.k_bias = torch.zeros_like(new.q_bias, requires_grad=False)
        new.proj, new.proj_drop = attention.output.dense, attention.output.dropout
        replacements.append((layer, "attention", new))
    return replacements


# ------------------------------------------------------------------------ vit-pytorch ViViT


_VIT_PYTORCH = "vit_pytorch.vivit"


def _is_vit_pytorch(model: nn.Module) -> bool:
    return _is(model, _VIT_PYTORCH, "ViViT")


class _PreNormAttention(FactorisedAttention):
    """As vit-pytorch's Attention, whose pre-LayerNorm (`norm`) lives inside it: (x, mask=None) -> output."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _unsupported_extras("vit-pytorch Attention", mask=mask)
        return super().forward(self.norm(x))


class _FactorisedSelfAttentionStack(nn.Module):
    """vit-pytorch's FactorizedTransformer on a (B, T, n, D) grid: per layer spatial attention (the n
    tokens of each frame), temporal attention (each token's T frames), feed-forward, each residual;
    then the final norm. The original moves tokens between per-frame and per-position batches
    twice a layer; here they stay where they are."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.layers = layers
        self.norm = norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _unsupported_extras("vit-pytorch FactorizedTransformer", mask=mask)
        for spatial, temporal, feed_forward in self.layers:
            x = spatial(x) + x
            x = temporal(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


def _vit_pytorch_attention(name: str, attn: nn.Module, mode: str, backend: str) -> _PreNormAttention:
    attention_class = _class(_VIT_PYTORCH, "Attention")
    if type(attn) is not attention_class:
        raise ValueError(f"convert: {name}: {type(attn).__qualname__} is not vit-pytorch's Attention")
    dim, inner = attn.to_qkv.in_features, attn.to_qkv.out_features // 3
    grid = _JOINT if mode == "joint" else dict(mode=mode)  # spatial / temporal get (B, T, n, D) grids
    new = _attention(
        name,
        attn,
        _PreNormAttention,
        dim=dim,
        num_heads=attn.heads,
        head_dim=inner // attn.heads,
        qkv_bias=False,
        attn_drop=attn.dropout_p,
        backend=backend,
        **grid,
    )
    new.norm, new.qkv = attn.norm, attn.to_qkv
    if isinstance(attn.to_out, nn.Identity):  # one head as wide as dim: no output projection
        new.proj, new.proj_drop = nn.Identity(), nn.Identity()
    else:
        new.proj, new.proj_drop = attn.to_out[0], attn.to_out[1]
    return new


def _convert_vit_pytorch(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a vit-pytorch ViViT"
    _no_mode(family, mode)
    _no_grid(
        family,
        frames,
        tokens_per_frame,
        "passes its attention (B, T, n, D) grids or per-frame sequences, so frames / tokens_per_frame are not needed",
    )
    replacements = []
    if model.variant == "factorized_encoder":
        for part in ("spatial_transformer", "temporal_transformer"):
            for i, (attn, _) in enumerate(getattr(model, part).layers):
                name = f"{part}.layers.{i}.0"
                new = _vit_pytorch_attention(name, attn, "joint", backend)
                replacements.append((getattr(model, part).layers[i], "0", new))
    elif model.variant == "factorized_self_attention":
        stack = model.factorized_transformer
        layers = nn.ModuleList()
        for i, (spatial, temporal, feed_forward) in enumerate(stack.layers):
            prefix = f"factorized_transformer.layers.{i}"
            layers.append(
                nn.ModuleList(
                    [
                        _vit_pytorch_attention(f"{prefix}.0", spatial, "spatial", backend),
                        _vit_pytorch_attention(f"{prefix}.1", temporal, "temporal", backend),
                        feed_forward,
                    ]
                )
            )
        new_stack = _FactorisedSelfAttentionStack(layers, stack.norm).train(stack.training)
        replacements.append((model, "factorized_transformer", new_stack))
    else:
        raise ValueError(f"convert: {family} with variant={model.variant!r} is not one convert knows")
    return replacements


_FAMILIES = (
    (_is_timm_vit, _convert_timm),
    (_is_timesformer, _convert_timesformer),
    (_is_hf_vivit, _convert_hf_vivit),
    (_is_videomae, _convert_videomae),
    (_is_vit_pytorch, _convert_vit_pytorch),
)
