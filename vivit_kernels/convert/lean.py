"""`convert(model, memory="lean")`: converted blocks keep for backward what the library's lean blocks keep.

A pre-norm block keeps about 16 D-wide tensors per token for backward (see `vivit_kernels.lean`).
Each converted block's class becomes a subclass of its family's block class whose forward
computes the pre-attention LayerNorm with the packed qkv projection (`norm_linear`), then the
attention on that qkv (`FactorisedAttention.attend`), the pre-MLP LayerNorm with the first MLP
projection (`norm_linear`) and the GELU with the second (`gelu_linear`): LayerNorms and GELU are
recomputed in backward and 10 D-wide tensors per token are kept. Only the class changes: the
block's modules, parameters, names and state dict are the original's.

TimeSformer's divided layers fuse their third LayerNorm too (`temporal_layernorm` with the
temporal qkv); `temporal_dense` follows the temporal attention as before. vit-pytorch has no
block class: its converted attention (the LayerNorm inside it) and its `FeedForward` change class.

The GELU is fused where the activation is one `gelu_linear` computes: exact (erf) GELU, or the
tanh approximation (PyTorch's, and transformers' `gelu_fast`, `gelu_new`, `gelu_pytorch_tanh`,
which compute the same function with other roundings). Another activation, or dropout between
the activation and the second projection in training, keeps that part unfused (the activation's
output is kept, as the original keeps it).
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch
from torch import nn

from ..attention import FactorisedAttention
from ..lean import gelu_linear, norm_linear, plain_linear
from .common import class_in, dropout_p, layer_mask, refuse_extras
from .hf_vivit import is_hf_vivit
from .timesformer import is_timesformer, timesformer_divided_layer
from .timm_vit import is_timm_vit, register_notrace
from .videomae import is_videomae
from .vit_pytorch import _PreNormAttention, is_vit_pytorch

_TIMM = "timm.models.vision_transformer"
_VIVIT = "transformers.models.vivit.modeling_vivit"
_VIDEOMAE = "transformers.models.videomae.modeling_videomae"
_TIMESFORMER = "transformers.models.timesformer.modeling_timesformer"
_VIT_PYTORCH = "vit_pytorch.vivit"

# Activation classes (module, name) computing GELU as gelu_linear's `approximate` says.
_GELUS = (
    ("timm.layers.activations", "GELU", "none"),
    ("timm.layers.activations", "GELUTanh", "tanh"),
    ("transformers.activations", "GELUActivation", "none"),
    ("transformers.activations", "GELUTanh", "tanh"),
    ("transformers.activations", "NewGELUActivation", "tanh"),
    ("transformers.activations", "FastGELUActivation", "tanh"),
)


def gelu_approximate(activation: nn.Module) -> str | None:
    """gelu_linear's `approximate` for an activation module computing that GELU; None for any other."""
    if type(activation) is nn.GELU:
        return activation.approximate
    for module, name, approximate in _GELUS:
        cls = class_in(module, name)
        if cls is not None and type(activation) is cls:
            return approximate
    return None


def _attention(x: torch.Tensor, norm: nn.LayerNorm, attention: FactorisedAttention, attn_mask=None) -> torch.Tensor:
    """attention(norm(x), attn_mask=attn_mask) for x (B, N, D) or a (B, T, S, D) grid, keeping x
    for backward, not norm(x)."""
    grid = x.dim() == 4
    frames = x.shape[1] if grid else attention.grid_frames(x.shape[1])
    qkv = attention.project_qkv(x.flatten(1, 2) if grid else x, norm)
    return attention.attend(qkv, frames, attn_mask=attn_mask).reshape(x.shape)


def _mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: nn.Module, fc2: nn.Linear, drop=None):
    """fc2(drop(activation(fc1(norm(x))))), keeping x and fc1's output for backward; the GELU is
    fused with fc2 unless the activation is no GELU gelu_linear computes or dropout is active."""
    # A projection wrapped by another library (an adapter's layer) is called as it is, unfused.
    hidden = norm_linear(x, norm, fc1.weight, fc1.bias) if plain_linear(fc1) else fc1(norm(x))
    approximate = gelu_approximate(activation)
    dropping = drop is not None and dropout_p(drop) > 0 and drop.training
    if approximate is None or dropping or not plain_linear(fc2):
        hidden = activation(hidden)
        return fc2(drop(hidden) if drop is not None else hidden)
    return gelu_linear(hidden, fc2.weight, fc2.bias, approximate)


def _named(cls: type, name: str) -> type:
    # Named as attributes of this module (its __getattr__), so pickle finds the classes.
    cls.__module__, cls.__qualname__, cls.__name__ = __name__, name, name
    return cls


@functools.cache
def timm_lean_block(base: type) -> type:
    """A subclass of timm's `Block` on FactorisedAttention, LayerNorms and GELU recomputed in backward."""

    class TimmLeanBlock(base):
        def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
            if is_causal or x.dim() != 3:  # refused (or reshaped) by the attention as the original does
                return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
            x = x + self.drop_path1(self.ls1(_attention(x, self.norm1, self.attn, attn_mask)))
            mlp = self.mlp
            return x + self.drop_path2(self.ls2(mlp.drop2(_mlp(x, self.norm2, mlp.fc1, mlp.act, mlp.fc2, mlp.drop1))))

    return _named(TimmLeanBlock, "TimmLeanBlock")


@functools.cache
def vivit_lean_layer(base: type) -> type:
    """A subclass of transformers' `VivitLayer` on FactorisedAttention, LayerNorms and GELU recomputed in backward."""

    class VivitLeanLayer(base):
        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
            refuse_extras("VivitAttention", output_attentions=kwargs.get("output_attentions"))
            mask = layer_mask("VivitAttention", attention_mask)
            hidden_states = hidden_states + self.dropout(
                _attention(hidden_states, self.layernorm_before, self.attention, mask)
            )
            mlp = self.mlp
            return hidden_states + self.dropout(
                _mlp(hidden_states, self.layernorm_after, mlp.fc1, mlp.activation_fn, mlp.fc2)
            )

    return _named(VivitLeanLayer, "VivitLeanLayer")


@functools.cache
def videomae_lean_layer(base: type) -> type:
    """A subclass of transformers' `VideoMAELayer` on FactorisedAttention, LayerNorms and GELU recomputed in backward."""

    class VideoMAELeanLayer(base):
        def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
            refuse_extras("VideoMAEAttention", output_attentions=kwargs.get("output_attentions"))
            hidden_states = hidden_states + _attention(hidden_states, self.layernorm_before, self.attention)
            intermediate, output = self.intermediate, self.output
            mlp = _mlp(
                hidden_states, self.layernorm_after, intermediate.dense, intermediate.intermediate_act_fn, output.dense
            )
            return output.dropout(mlp) + hidden_states

    return _named(VideoMAELeanLayer, "VideoMAELeanLayer")


def _timesformer_mlp(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """output(intermediate(layernorm_after(hidden_states))) of a TimesformerLayer (its dropout
    sits between the activation and output.dense)."""
    intermediate, output = layer.intermediate, layer.output
    return output.dropout(
        _mlp(
            hidden_states,
            layer.layernorm_after,
            intermediate.dense,
            intermediate.intermediate_act_fn,
            output.dense,
            intermediate.dropout,
        )
    )


@functools.cache
def timesformer_lean_layer(base: type) -> type:
    """A subclass of transformers' `TimesformerLayer` (space_only / joint_space_time, on joint
    FactorisedAttention), LayerNorms and GELU recomputed in backward."""

    class TimesformerLeanLayer(base):
        def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor]:
            refuse_extras("TimeSformerAttention", output_attentions=output_attentions)
            attention = _attention(hidden_states, self.layernorm_before, self.attention)
            hidden_states = hidden_states + self.drop_path(attention)
            return (hidden_states + self.drop_path(_timesformer_mlp(self, hidden_states)),)

    return _named(TimesformerLeanLayer, "TimesformerLeanLayer")


@functools.cache
def timesformer_lean_divided_layer(base: type) -> type:
    """A subclass of the divided layer convert makes of `TimesformerLayer` (`timesformer.py`): its
    three LayerNorms (temporal, spatial, MLP) and GELU recomputed in backward."""

    class TimesformerLeanDividedLayer(base):
        def _normed_attention(self, x: torch.Tensor, norm: nn.Module, attention: nn.Module) -> torch.Tensor:
            return _attention(x, norm, attention)

        def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return _timesformer_mlp(self, hidden_states)

    return _named(TimesformerLeanDividedLayer, "TimesformerLeanDividedLayer")


class VitPytorchLeanAttention(_PreNormAttention):
    """vit-pytorch's Attention converted, its LayerNorm (`norm`) computed with `to_qkv`: x (B, N, D)
    or a (B, T, n, D) grid, mask as `_PreNormAttention` takes it."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() not in (3, 4):  # refused as the converted attention refuses it
            return super().forward(x, mask)
        return _attention(x, self.norm, self, layer_mask("vit-pytorch Attention", mask))


@functools.cache
def vit_pytorch_lean_feed_forward(base: type) -> type:
    """A subclass of vit-pytorch's `FeedForward` (LayerNorm, Linear, GELU, Dropout, Linear, Dropout),
    LayerNorm and GELU recomputed in backward."""

    class VitPytorchLeanFeedForward(base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            norm, fc1, activation, drop, fc2, drop2 = self.net
            return drop2(_mlp(x, norm, fc1, activation, fc2, drop))

    return _named(VitPytorchLeanFeedForward, "VitPytorchLeanFeedForward")


_CLASSES = {
    "TimmLeanBlock": (_TIMM, "Block", timm_lean_block),
    "VivitLeanLayer": (_VIVIT, "VivitLayer", vivit_lean_layer),
    "VideoMAELeanLayer": (_VIDEOMAE, "VideoMAELayer", videomae_lean_layer),
    "TimesformerLeanLayer": (_TIMESFORMER, "TimesformerLayer", timesformer_lean_layer),
    "TimesformerLeanDividedLayer": (
        _TIMESFORMER,
        "TimesformerLayer",
        lambda base: timesformer_lean_divided_layer(timesformer_divided_layer(base)),
    ),
    "VitPytorchLeanFeedForward": (_VIT_PYTORCH, "FeedForward", vit_pytorch_lean_feed_forward),
}


def __getattr__(name: str):
    if name in _CLASSES:
        module, base, make = _CLASSES[name]
        importlib.import_module(module)
        return make(getattr(sys.modules[module], base))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_norm(name: str, norm: nn.Module) -> None:
    if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise ValueError(
            f"convert: {name}: memory='lean' fuses a LayerNorm over the last dim with the next projection, got "
            f"{type(norm).__module__}.{type(norm).__qualname__}"
        )


def _check_linear(name: str, linear: nn.Module) -> None:
    if not plain_linear(linear):
        raise ValueError(f"convert: {name}: memory='lean' needs an nn.Linear there, got {type(linear).__qualname__}")


def _lean_timm(model: nn.Module) -> list:
    block_class = class_in(_TIMM, "Block")
    mlp_class = class_in("timm.layers.mlp", "Mlp")
    lean = timm_lean_block(block_class)
    register_notrace(lean)  # as the converted attention: its forward branches on shapes
    swaps = []
    for i, block in enumerate(getattr(model, "blocks", ())):
        name = f"blocks.{i}"
        if type(block) not in (block_class, lean):
            raise ValueError(
                f"convert: {name}: memory='lean' rewrites timm's Block, got {type(block).__module__}."
                f"{type(block).__qualname__} (another block computes another function)"
            )
        mlp = getattr(block, "mlp", None)
        if type(mlp) is not mlp_class or not isinstance(mlp.norm, nn.Identity):
            raise ValueError(
                f"convert: {name}.mlp: memory='lean' rewrites timm's Mlp without a hidden norm, got "
                f"{type(mlp).__qualname__}{'' if type(mlp) is not mlp_class else ' with a hidden norm'}"
            )
        _check_norm(f"{name}.norm1", block.norm1)
        _check_norm(f"{name}.norm2", block.norm2)
        _check_linear(f"{name}.mlp.fc1", mlp.fc1)
        _check_linear(f"{name}.mlp.fc2", mlp.fc2)
        swaps.append((block, "__class__", lean))
    return swaps


def _lean_hf(model: nn.Module, module: str, layer_name: str, make, linears: tuple[str, ...]) -> list:
    base = class_in(module, layer_name)
    lean = make(base)
    swaps = []
    for name, layer in model.named_modules():
        if type(layer) is not base:
            continue
        for norm in ("layernorm_before", "layernorm_after"):
            _check_norm(f"{name}.{norm}", getattr(layer, norm))
        for linear in linears:
            _check_linear(f"{name}.{linear}", layer.get_submodule(linear))
        swaps.append((layer, "__class__", lean))
    return swaps


def _lean_vivit(model: nn.Module) -> list:
    return _lean_hf(model, _VIVIT, "VivitLayer", vivit_lean_layer, ("mlp.fc1", "mlp.fc2"))


def _lean_videomae(model: nn.Module) -> list:
    return _lean_hf(model, _VIDEOMAE, "VideoMAELayer", videomae_lean_layer, ("intermediate.dense", "output.dense"))


def _lean_timesformer(model: nn.Module) -> list:
    base = class_in(_TIMESFORMER, "TimesformerLayer")
    divided, joint = timesformer_lean_divided_layer(timesformer_divided_layer(base)), timesformer_lean_layer(base)
    swaps = []
    for name, layer in model.named_modules():
        if type(layer) is not base:
            continue
        is_divided = layer.attention_type == "divided_space_time"
        norms = ("temporal_layernorm",) * is_divided + ("layernorm_before", "layernorm_after")
        for norm in norms:
            _check_norm(f"{name}.{norm}", getattr(layer, norm))
        for linear in ("intermediate.dense", "output.dense"):
            _check_linear(f"{name}.{linear}", layer.get_submodule(linear))
        # Applied after convert's own class swap of a divided layer, so this one is kept.
        swaps.append((layer, "__class__", divided if is_divided else joint))
    return swaps


def _lean_vit_pytorch(model: nn.Module) -> list:
    """The FeedForwards' swaps; the converted attentions' follow from convert's replacements (`lean_attentions`)."""
    attention_class, feed_forward_class = class_in(_VIT_PYTORCH, "Attention"), class_in(_VIT_PYTORCH, "FeedForward")
    lean = vit_pytorch_lean_feed_forward(feed_forward_class)
    swaps = []
    for name, module in model.named_modules():
        if type(module) is attention_class:
            _check_norm(f"{name}.norm", module.norm)
        elif type(module) is feed_forward_class:
            net = module.net
            if len(net) != 6:
                raise ValueError(
                    f"convert: {name}.net: memory='lean' rewrites vit-pytorch's FeedForward of LayerNorm, Linear, "
                    f"activation, Dropout, Linear, Dropout; got {len(net)} modules"
                )
            _check_norm(f"{name}.net.0", net[0])
            _check_linear(f"{name}.net.1", net[1])
            _check_linear(f"{name}.net.4", net[4])
            swaps.append((module, "__class__", lean))
    return swaps


LEAN_FAMILIES = (
    (is_timm_vit, _lean_timm),
    (is_timesformer, _lean_timesformer),
    (is_hf_vivit, _lean_vivit),
    (is_videomae, _lean_videomae),
    (is_vit_pytorch, _lean_vit_pytorch),
)


def lean_layers(model: nn.Module) -> list:
    """(layer, "__class__", lean class) for every block of `model` that memory="lean" rewrites; checks
    them all first and changes nothing."""
    for recognises, lean_family in LEAN_FAMILIES:
        if recognises(model):
            return lean_family(model)
    return []


def lean_attentions(replacements: list) -> list:
    """(attention, "__class__", lean class) for every attention among convert's `replacements` (or
    inside them) that computes its own pre-LayerNorm (vit-pytorch's): those modules are made by
    the conversion, so they are found there."""
    new_modules = (module for _, attribute, module in replacements if attribute != "__class__")
    return [
        (attention, "__class__", VitPytorchLeanAttention)
        for module in new_modules
        for attention in module.modules()
        if type(attention) is _PreNormAttention
    ]
