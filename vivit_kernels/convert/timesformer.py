"""Hugging Face `TimesformerModel`: divided space-time layers run temporal then spatial
FactorisedAttention on the whole sequence; space_only / joint_space_time: joint attention."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..attention import FactorisedAttention
from .common import (
    JOINT,
    AdoptedAttention,
    adopting_attention,
    check_no_grid,
    check_no_mode,
    class_in,
    dropout_p,
    is_instance_of,
    refuse_extras,
)
from .state import read_saved_keys

_TIMESFORMER = "transformers.models.timesformer.modeling_timesformer"


def is_timesformer(model: nn.Module) -> bool:
    return is_instance_of(getattr(model, "base_model", None), _TIMESFORMER, "TimesformerModel")


class _TimesformerAttention(AdoptedAttention):
    """FactorisedAttention on a `TimeSformerAttention`'s packed qkv (`attention.qkv`) and output dense."""

    qkv_parts = ("attention.qkv",)
    output_parts = ("output.dense", "output.dropout")


def _timesformer_attention(name: str, attention: nn.Module, cls: type, backend: str, **grid) -> _TimesformerAttention:
    """A `cls` (a _TimesformerAttention) taking over a `TimeSformerAttention`'s modules."""
    if isinstance(attention, FactorisedAttention):
        raise ValueError(f"convert: {name} is converted already (converted twice?)")
    inner = attention.attention
    return adopting_attention(
        name,
        attention,
        cls,
        dim=inner.qkv.in_features,
        num_heads=inner.num_heads,
        attn_drop=dropout_p(inner.attn_drop),
        backend=backend,
        **grid,
    )


def convert_timesformer(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a TimeSformer"
    check_no_mode(family, mode)
    layer_class = class_in(_TIMESFORMER, "TimesformerLayer")
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
            layer_class_new = timesformer_divided_layer(layer_class)
            temporal = _timesformer_attention(
                f"{name}.temporal_attention",
                layer.temporal_attention,
                _TimesformerAttention,
                backend,
                mode="temporal",
                **grid,
            )
            spatial = _timesformer_attention(
                f"{name}.attention", layer.attention, _TimesformerAttention, backend, mode="spatial", **grid
            )
            replacements += [
                (layer, "temporal_attention", temporal),
                (layer, "attention", spatial),
                (layer, "__class__", layer_class_new),
            ]
        else:  # space_only, joint_space_time: one attention over the layer's whole input
            check_no_grid(f"{family} with attention_type={layer.attention_type!r}", frames, tokens_per_frame)
            new = _timesformer_attention(
                f"{name}.attention", layer.attention, _TimesformerJointAttention, backend, **JOINT
            )
            replacements.append((layer, "attention", new))
    if not replacements:
        raise ValueError(
            f"convert: found no TimesformerLayer to convert in {type(model).__qualname__} (converted twice?)"
        )
    read_saved_keys(model)
    return replacements


class _TimesformerJointAttention(_TimesformerAttention):
    """As transformers' TimeSformerAttention: (hidden_states, output_attentions) -> (output,)."""

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False) -> tuple[torch.Tensor]:
        refuse_extras("TimeSformerAttention", output_attentions=output_attentions)
        return (super().forward(hidden_states),)


def _group_drop_mask(like: torch.Tensor, drop_prob: float, mask_shape: tuple) -> torch.Tensor:
    """Stochastic depth with one draw per group: a mask of `mask_shape` (broadcast over the groups'
    tensor `like`), each entry 0 or 1 / keep."""
    keep = 1.0 - drop_prob
    return torch.empty(mask_shape, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)


@functools.cache
def timesformer_divided_layer(base: type) -> type:
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
            refuse_extras("TimesformerLayer", output_attentions=output_attentions)
            B, N, D = hidden_states.shape
            T = self.temporal_attention.grid_frames(N)
            S = (N - 1) // T
            drop_prob = getattr(self.drop_path, "drop_prob", 0.0) if self.training else 0.0

            # Temporal: the class token's row (it attends only to itself) is dropped: it skips this branch.
            temporal = self._normed_attention(hidden_states, self.temporal_layernorm, self.temporal_attention)[:, 1:]
            if drop_prob:
                position_mask = _group_drop_mask(temporal, drop_prob, (B, S, 1, 1))
                temporal = (temporal.view(B, S, T, D) * position_mask).view(B, S * T, D)
            patches = hidden_states[:, 1:] + self.temporal_dense(temporal)
            hidden_states = torch.cat((hidden_states[:, :1], patches), 1)

            # Spatial: the class token attends within every frame; its T outputs come back averaged.
            spatial = self._normed_attention(hidden_states, self.layernorm_before, self.attention)
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

            return (hidden_states + self.drop_path(self._feed_forward(hidden_states)),)

        # The two steps memory="lean" computes otherwise (convert/lean.py overrides them).
        def _normed_attention(self, x: torch.Tensor, norm: nn.Module, attention: nn.Module) -> torch.Tensor:
            return attention(norm(x))

        def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.output(self.intermediate(self.layernorm_after(hidden_states)))

    # Named as an attribute of the package (its __getattr__), so pickle finds the class.
    TimesformerDividedLayer.__module__ = __package__
    TimesformerDividedLayer.__qualname__ = "TimesformerDividedLayer"
    return TimesformerDividedLayer
