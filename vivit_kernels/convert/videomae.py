"""Hugging Face `VideoMAEModel`: joint attention with a query and value bias (the key bias is zero)."""

from __future__ import annotations

import torch
from torch import nn

from .common import (
    JOINT,
    AdoptedAttention,
    adopting_attention,
    is_instance_of,
    joint_attentions,
    refuse_extras,
    refuse_recorded_attentions,
    scale_or_default,
)
from .state import read_saved_keys

_VIDEOMAE = "transformers.models.videomae.modeling_videomae"


def is_videomae(model: nn.Module) -> bool:
    return is_instance_of(getattr(model, "base_model", None), _VIDEOMAE, "VideoMAEModel")


class _VideoMAEAttention(AdoptedAttention):
    """As transformers 5's VideoMAEAttention (self-attention and output dense): (hidden_states, **kwargs) -> output.
    The key has no bias: a zero one is formed when the projections are stacked (no buffer, which a
    model built on the meta device and materialised would leave uninitialised)."""

    qkv_parts = ("attention.query", "attention.key", "attention.value")
    output_parts = ("output.dense", "output.dropout")

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        refuse_extras("VideoMAEAttention", output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states)


def convert_videomae(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attention in joint_attentions(
        model, "a VideoMAE", _VIDEOMAE, "VideoMAEAttention", mode, frames, tokens_per_frame
    ):
        inner = attention.attention
        new = adopting_attention(
            name,
            attention,
            _VideoMAEAttention,
            dim=inner.query.in_features,
            num_heads=inner.num_attention_heads,
            head_dim=inner.attention_head_size,
            attn_drop=inner.dropout_prob,
            scale=scale_or_default(inner.scaling, inner.attention_head_size),
            backend=backend,
            **JOINT,
        )
        replacements.append((layer, "attention", new))
    read_saved_keys(model)
    refuse_recorded_attentions(model.base_model, "VideoMAEAttention")
    return replacements
