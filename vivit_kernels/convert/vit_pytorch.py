"""vit-pytorch `ViViT`: factorised encoder (joint attention in both transformers) and factorised
self-attention (spatial and temporal attention on the (B, T, n, D) grid)."""

from __future__ import annotations

import torch
from torch import nn

from .common import (
    JOINT,
    AdoptedAttention,
    adopting_attention,
    check_no_grid,
    check_no_mode,
    class_in,
    is_instance_of,
    layer_mask,
    refuse_extras,
)

_VIT_PYTORCH = "vit_pytorch.vivit"


def is_vit_pytorch(model: nn.Module) -> bool:
    return is_instance_of(model, _VIT_PYTORCH, "ViViT")


class _PreNormAttention(AdoptedAttention):
    """As vit-pytorch's Attention, whose pre-LayerNorm (`norm`) lives inside it: (x, mask=None) -> output;
    mask: (B, N) key padding, True attends (joint mode only, as the factorized encoder's temporal transformer)."""

    qkv_parts = ("to_qkv",)
    output_parts = ("to_out",)  # Linear and Dropout, or Identity (one head as wide as dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(self.norm(x), attn_mask=layer_mask("vit-pytorch Attention", mask))


class _FactorisedSelfAttentionStack(nn.Module):
    """vit-pytorch's FactorizedTransformer on a (B, T, n, D) grid: per layer spatial attention (the n
    tokens of each frame), temporal attention (each token's T frames), feed-forward, each residual;
    then the final norm. The original moves tokens between per-frame and per-position batches
    twice a layer; here they stay where they are."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm  # registered first, as in the original: the state dict lists it first
        self.layers = layers

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        refuse_extras("vit-pytorch FactorizedTransformer", mask=mask)
        for spatial, temporal, feed_forward in self.layers:
            x = spatial(x) + x
            x = temporal(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


def _vit_pytorch_attention(name: str, attn: nn.Module, mode: str, backend: str) -> _PreNormAttention:
    attention_class = class_in(_VIT_PYTORCH, "Attention")
    if type(attn) is not attention_class:
        raise ValueError(f"convert: {name}: {type(attn).__qualname__} is not vit-pytorch's Attention")
    dim, inner = attn.to_qkv.in_features, attn.to_qkv.out_features // 3
    grid = JOINT if mode == "joint" else dict(mode=mode)  # spatial / temporal get (B, T, n, D) grids
    return adopting_attention(
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


def convert_vit_pytorch(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a vit-pytorch ViViT"
    check_no_mode(family, mode)
    check_no_grid(
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
