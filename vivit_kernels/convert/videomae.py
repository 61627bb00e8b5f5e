"""Hugging Face `VideoMAEModel`: joint attention with a query and value bias (the key bias is zero)."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import FactorisedAttention
from .common import (
    JOINT,
    attention_like,
    is_instance_of,
    joint_attentions,
    packed_linear,
    refuse_extras,
    scale_or_default,
)

_VIDEOMAE = "transformers.models.videomae.modeling_videomae"


def is_videomae(model: nn.Module) -> bool:
    return is_instance_of(getattr(model, "base_model", None), _VIDEOMAE, "VideoMAEModel")


class _VideoMAEAttention(FactorisedAttention):
    """As transformers 5's VideoMAEAttention (self-attention and output dense): (hidden_states, **kwargs) -> output."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        refuse_extras("VideoMAEAttention", output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states)


def convert_videomae(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attention in joint_attentions(
        model, "a VideoMAE", _VIDEOMAE, "VideoMAEAttention", mode, frames, tokens_per_frame
    ):
        inner = attention.attention
        biased = inner.query.bias is not None
        # VideoMAE has no key bias; ours is then a zero buffer (key_bias=False), never trained.
        new = attention_like(
            name,
            attention,
            _VideoMAEAttention,
            dim=inner.query.in_features,
            num_heads=inner.num_attention_heads,
            head_dim=inner.attention_head_size,
            qkv_bias=biased,
            key_bias=False,
            attn_drop=inner.dropout_prob,
            scale=scale_or_default(inner.scaling, inner.attention_head_size),
            backend=backend,
            **JOINT,
        )
        new.qkv = packed_linear(inner.query, inner.key, inner.value, bias=False)
        if biased:
            new.q_bias = nn.Parameter(inner.query.bias.detach().clone(), requires_grad=inner.query.bias.requires_grad)
            new.v_bias = nn.Parameter(inner.value.bias.detach().clone(), requires_grad=inner.value.bias.requires_grad)
            new.k_bias = torch.zeros_like(new.q_bias, requires_grad=False)
        new.proj, new.proj_drop = attention.output.dense, attention.output.dropout
        replacements.append((layer, "attention", new))
    return replacements
