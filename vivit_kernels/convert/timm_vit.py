"""timm `VisionTransformer`: every block's `Attention` becomes FactorisedAttention in any mode."""

from __future__ import annotations

import math
import sys

from torch import nn

from ..attention import FactorisedAttention
from .common import (
    JOINT,
    attention_like,
    check_no_grid,
    class_in,
    is_instance_of,
)
from .state import check_same_state


def register_notrace(cls: type) -> None:
    """Make timm's FX tracing (`create_feature_extractor`, `get_graph_node_names`, its model tests) keep
    `cls` as one leaf call: its forward branches on shapes and dispatches to kernels, which FX cannot trace."""
    register = getattr(sys.modules.get("timm.layers"), "register_notrace_module", None)
    if register is not None:
        register(cls)


def is_timm_vit(model: nn.Module) -> bool:
    return is_instance_of(model, "timm.models.vision_transformer", "VisionTransformer")


def convert_timm(model, *, mode, frames, tokens_per_frame, backend) -> list:
    family = "a timm VisionTransformer"
    if mode is None:
        raise ValueError(
            f"convert: {family} is an image model, so mode is required: 'joint' keeps its function; 'spatial', "
            "'temporal' or 'split' attend over the frames of a time-major token sequence"
        )
    timm_attention = class_in("timm.models.vision_transformer", "Attention")
    if mode == "joint":
        check_no_grid(f"{family} with mode='joint'", frames, tokens_per_frame)
        grid = dict(JOINT)
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
        new = attention_like(
            name, attn, dim=dim, num_heads=attn.num_heads, head_dim=attn.head_dim, backend=backend, **grid
        )
        # timm's fused path uses SDPA's default scale, head_dim ** -0.5, which is ours.
        for module in ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"):
            setattr(new, module, getattr(attn, module))
        check_same_state(name, new, attn)  # timm's names are ours
        register_notrace(type(new))
        replacements.append((block, "attn", new))
    return replacements
