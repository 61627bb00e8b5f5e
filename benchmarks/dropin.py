"""The drop-in case: a training step of a model from another library, as built there ("original")
and after `vivit_kernels.convert` ("converted", backend "auto").

A step is the cross-entropy loss of the model's logits, its backward and an AdamW update
(zero_grad runs untimed before it), fp32 on the CPU and under bf16 autocast on GPUs, like the
ViViT training step. The CPU runs small models (width 192, 3 heads of 64, 4 layers, 8 frames
of 112 x 112); GPUs run each family's base configuration (width 768, 12 heads, 224 x 224).
Before anything is timed, `check_against_original` runs both once in fp32 and compares the
logits and the patch embedding's gradient (which every attention layer's backward reaches).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

import vivit_kernels

from .core import Case, check_matches, parse_target, train_step_case

ORIGINAL, CONVERTED = "original", "converted"
DROPIN_BACKENDS = (ORIGINAL, CONVERTED)
DROPIN_TARGETS = ("cpu-float32", "cuda-bfloat16")
CLASSES = 400

# family -> (package it needs, convert() options)
FAMILIES = {
    "timm_vit": ("timm", dict(mode="joint")),
    "timesformer": ("transformers", {}),
    "hf_vivit": ("transformers", {}),
    "videomae": ("transformers", {}),
    "vit_pytorch_factorized_encoder": ("vit_pytorch", {}),
    "vit_pytorch_factorized_self_attention": ("vit_pytorch", {}),
}

# Model width, heads, depth, batch and clip: CPU-sized and each family's base configuration.
_SMALL = dict(dim=192, heads=3, depth=4, B=2, frames=8, img_size=112)
_BASE = dict(dim=768, heads=12, depth=12, B=8, frames=8, img_size=224)
DROPIN_SHAPES = {
    "cpu": {family: dict(_SMALL) for family in FAMILIES},
    "cuda": {family: dict(_BASE) for family in FAMILIES},
}
DROPIN_SHAPES["cpu"]["timm_vit"].update(B=16)  # images: one frame each
DROPIN_SHAPES["cuda"]["timm_vit"].update(B=64)
DROPIN_SHAPES["cuda"]["hf_vivit"].update(frames=32, B=4)  # google/vivit-b-16x2-kinetics400: 3137 tokens
DROPIN_SHAPES["cuda"]["videomae"].update(frames=16)
DROPIN_SHAPES["cuda"]["vit_pytorch_factorized_encoder"].update(frames=16)
DROPIN_SHAPES["cuda"]["vit_pytorch_factorized_self_attention"].update(frames=16)
# --benchmark-disable: one quick step per family.
DROPIN_SMOKE = dict(dim=64, heads=2, depth=1, B=1, frames=4, img_size=32)


def dropin_skip_reason(spec: dict) -> str | None:
    package = FAMILIES[spec["variant"]][0]
    try:
        importlib.import_module(package)
    except ImportError as error:
        return f"{spec['variant']} needs {package}: {error}"
    return None


def _original(family: str, shape: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model as its library builds it (seeded) and a random input batch."""
    D, H, L, B, T, size = (shape[k] for k in ("dim", "heads", "depth", "B", "frames", "img_size"))
    patch = 16
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if family == "timm_vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=size, patch_size=patch, embed_dim=D, depth=L, num_heads=H, num_classes=CLASSES, qkv_bias=True
        )
        return model, torch.randn(B, 3, size, size, generator=g)
    if family.startswith("vit_pytorch"):
        from vit_pytorch.vivit import ViViT

        model = ViViT(
            image_size=size,
            image_patch_size=patch,
            frames=T,
            frame_patch_size=2,
            num_classes=CLASSES,
            dim=D,
            spatial_depth=L,
            temporal_depth=L if family.endswith("self_attention") else max(1, L // 3),
            heads=H,
            dim_head=D // H,
            mlp_dim=4 * D,
            variant=family.removeprefix("vit_pytorch_"),
        )
        return model, torch.randn(B, 3, T, size, size, generator=g)
    import transformers

    common = dict(
        image_size=size,
        num_frames=T,
        hidden_size=D,
        num_hidden_layers=L,
        num_attention_heads=H,
        intermediate_size=4 * D,
        num_labels=CLASSES,
    )
    if family == "timesformer":
        model = transformers.TimesformerForVideoClassification(
            transformers.TimesformerConfig(patch_size=patch, **common)
        )
    elif family == "hf_vivit":
        model = transformers.VivitForVideoClassification(
            transformers.VivitConfig(tubelet_size=[2, patch, patch], **common)
        )
    else:
        model = transformers.VideoMAEForVideoClassification(
            transformers.VideoMAEConfig(patch_size=patch, tubelet_size=2, **common)
        )
    return model, torch.randn(B, T, 3, size, size, generator=g)


def dropin_model(spec: dict, device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, Callable]:
    """(model on `device`, input batch, model -> logits): the original, or the same weights converted."""
    family = spec["variant"]
    model, inputs = _original(family, spec["shape"])
    if spec["backend"] == CONVERTED:
        vivit_kernels.convert(model, backend="auto", **FAMILIES[family][1])
    logits = (
        (lambda m, x: m(x)) if family == "timm_vit" or family.startswith("vit_pytorch") else (lambda m, x: m(x).logits)
    )
    return model.to(device), inputs.to(device), logits


def _patch_embedding_weight(model: torch.nn.Module) -> torch.Tensor:
    """The first layer's weight: its gradient has passed through every attention layer's backward."""
    for p in model.parameters():
        if p.dim() >= 2:
            return p
    raise AssertionError(f"{type(model).__name__} has no weight matrix")


def check_against_original(spec: dict, tolerance: float = 1e-4) -> None:
    """Raise AssertionError unless the converted model's logits and first-layer gradient match the
    original's in fp32 on the target device. A right conversion is off by ~1e-6 at the CPU sizes;
    a wrong one by 2e-3 (TimeSformer's tokens read time-major: the libraries' initial weights
    make attention nearly uniform) to O(1)."""
    if spec["backend"] == ORIGINAL:
        return
    device = torch.device(spec["target"].split("-")[0])
    results = []
    for backend in DROPIN_BACKENDS:
        model, inputs, logits = dropin_model(dict(spec, backend=backend), device)
        model.train()
        out = logits(model, inputs)
        out.square().mean().backward()
        results.append((out.detach(), _patch_embedding_weight(model).grad))
    pairs = zip(("logits", "patch embedding gradient"), *results)
    check_matches(f"dropin {spec['variant']}: converted", "the original's", pairs, tolerance)


def dropin_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    model, inputs, logits = dropin_model(spec, device)
    labels = torch.randint(0, CLASSES, (inputs.shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
    return train_step_case(model, lambda: logits(model, inputs), labels, device, dtype)
