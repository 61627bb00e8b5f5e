"""Hugging Face `VivitModel`: joint attention on its q/k/v projections, stacked when used."""

from __future__ import annotations

import torch
from torch import nn

from .common import (
    JOINT,
    AdoptedAttention,
    adopting_attention,
    is_instance_of,
    joint_attentions,
    layer_mask,
    refuse_extras,
    refuse_recorded_attentions,
    scale_or_default,
)
from .state import read_saved_keys

_VIVIT = "transformers.models.vivit.modeling_vivit"


def is_hf_vivit(model: nn.Module) -> bool:
    return is_instance_of(getattr(model, "base_model", None), _VIVIT, "VivitModel")


class _VivitAttention(AdoptedAttention):
    """As transformers' VivitAttention: (hidden_states, attention_mask, **kwargs) -> (output, weights=None);
    the mask as `VivitModel` builds it (4-D bool or additive, all-visible under torch.export)."""

    qkv_parts = ("q_proj", "k_proj", "v_proj")
    output_parts = ("o_proj",)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        refuse_extras("VivitAttention", output_attentions=kwargs.get("output_attentions"))
        return super().forward(hidden_states, attn_mask=layer_mask("VivitAttention", attention_mask)), None


def convert_hf_vivit(model, *, mode, frames, tokens_per_frame, backend) -> list:
    replacements = []
    for name, layer, attn in joint_attentions(
        model, "a ViViT (transformers)", _VIVIT, "VivitAttention", mode, frames, tokens_per_frame
    ):
        new = adopting_attention(
            name,
            attn,
            _VivitAttention,
            dim=attn.q_proj.in_features,
            num_heads=attn.num_attention_heads,
            head_dim=attn.head_dim,
            attn_drop=attn.attention_dropout,
            scale=scale_or_default(attn.scaling, attn.head_dim),
            backend=backend,
            **JOINT,
        )
        replacements.append((layer, "attention", new))
    read_saved_keys(model)
    refuse_recorded_attentions(model.base_model, "VivitAttention")
    return replacements
