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
    refuse_recorded_attentions,
    scale_or_default,
)
from .state import keep_original_keys, read_saved_keys

_VIDEOMAE = "transformers.models.videomae.modeling_videomae"


def is_videomae(model: nn.Module) -> bool:
    return is_instance_of(getattr(model, "base_model", None), _VIDEOMAE, "VideoMAEModel")


class _VideoMAEAttention(FactorisedAttention):
    """As transformers 5's VideoMAEAttention (self-attention and output dense): (hidden_states, **kwargs) -> output."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        refuse_extras("VideoMAEAttention", output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states)

    # The zero key bias is no buffer: a model built on the meta device and materialised
    # (from_pretrained, to_empty, deferred init) would leave a buffer uninitialised, as no state
    # dict holds it. Formed from q_bias when used, it is zero on any device and dtype.
    @property
    def k_bias(self) -> torch.Tensor | None:
        return None if self.q_bias is None else torch.zeros_like(self.q_bias, requires_grad=False)

    @k_bias.setter
    def k_bias(self, value: None) -> None:
        if value is not None:
            raise AttributeError("VideoMAEAttention (converted by vivit_kernels): k_bias is zero and cannot be set")


def convert_videomae(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attention in joint_attentions(
        model, "a VideoMAE", _VIDEOMAE, "VideoMAEAttention", mode, frames, tokens_per_frame
    ):
        inner = attention.attention
        biased = inner.query.bias is not None
        # VideoMAE has no key bias: the query and value biases are the original's parameters, the
        # zero key bias is formed when used (see _VideoMAEAttention.k_bias).
        new = attention_like(
            name,
            attention,
            _VideoMAEAttention,
            dim=inner.query.in_features,
            num_heads=inner.num_attention_heads,
            head_dim=inner.attention_head_size,
            qkv_bias=False,
            attn_drop=inner.dropout_prob,
            scale=scale_or_default(inner.scaling, inner.attention_head_size),
            backend=backend,
            **JOINT,
        )
        new.qkv = packed_linear(inner.query, inner.key, inner.value, bias=False)
        if biased:
            new.q_bias, new.v_bias = inner.query.bias, inner.value.bias
        new.proj, new.proj_drop = attention.output.dense, attention.output.dropout
        keep_original_keys(
            name,
            new,
            attention,
            renamed={"q_bias": "attention.query.bias", "v_bias": "attention.value.bias", "proj": "output.dense"},
            packed={"qkv": ("attention.query", "attention.key", "attention.value")},
        )
        replacements.append((layer, "attention", new))
    read_saved_keys(model)
    refuse_recorded_attentions(model.base_model, "VideoMAEAttention")
    return replacements
