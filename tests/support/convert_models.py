"""Small random models of each family `vivit_kernels.convert` knows, and the parity check the convert
tests hold converted models to.

Each builder imports its library when called and skips the calling test, saying why, where the
library is missing: a machine with only timm runs the timm tests, and so on for each family.
"""

from __future__ import annotations

import copy
from types import ModuleType

import pytest
import torch
from conftest import relative_error, require_transformers
from torch import nn

from vivit_kernels import FactorisedAttention, convert

TOLERANCE = 1e-5  # fp32 outputs and gradients against the original's, relative


def import_timm() -> ModuleType:
    """timm, else a skip of the calling test."""
    __tracebackhide__ = True
    return pytest.importorskip("timm", reason="timm builds the reference ViTs")


def import_transformers() -> ModuleType:
    """transformers, else a skip of the calling test."""
    __tracebackhide__ = True
    return require_transformers("transformers builds the reference video models")


def import_vit_pytorch_vivit() -> ModuleType:
    """vit_pytorch.vivit, else a skip of the calling test."""
    __tracebackhide__ = True
    return pytest.importorskip("vit_pytorch.vivit", reason="vit-pytorch builds the reference ViViT")


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and of unit-scale effect: weights ~ N(0, 1/fan_in), biases and norm
    shifts ~ N(0, 0.3), norm scales ~ 1 + N(0, 0.3), embeddings ~ N(0, 0.5). The libraries
    initialise biases to zero, where a dropped bias would go unnoticed."""
    g = torch.Generator().manual_seed(seed)

    def fill(p: torch.Tensor, mean: float, std: float) -> None:
        p.copy_(mean + std * torch.randn(p.shape, generator=g))

    with torch.no_grad():
        seen = set()
        for module in model.modules():
            weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                fill(weight, 0.0, weight[0].numel() ** -0.5)
            elif isinstance(module, nn.LayerNorm) and weight is not None:
                fill(weight, 1.0, 0.3)
            else:
                continue
            seen.add(weight)
            if isinstance(bias, nn.Parameter):
                fill(bias, 0.0, 0.3)
                seen.add(bias)
        for p in model.parameters():
            if p not in seen:
                fill(p, 0.0, 0.5)
    return model


# ------------------------------------------------------------------------------ the families


def timm_vit(*, seed: int = 0, **overrides) -> nn.Module:
    """timm's VisionTransformer on 32x32 images: 16 patches, width 48, 2 blocks of 4 heads."""
    timm = import_timm()
    options = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5) | overrides
    return randomised(timm.models.vision_transformer.VisionTransformer(**options), seed)


def timesformer(cls_name: str = "TimesformerModel", *, seed: int = 0, **overrides) -> nn.Module:
    """transformers' `cls_name` (a TimeSformer class) on (B, 3, 3, 32, 32) clips, width 32, 2 layers."""
    transformers = import_transformers()
    options = dict(
        image_size=32,
        patch_size=8,
        num_frames=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return randomised(getattr(transformers, cls_name)(transformers.TimesformerConfig(**options | overrides)), seed)


def hf_vivit(cls_name: str = "VivitModel", *, seed: int = 0, **overrides) -> nn.Module:
    """transformers' `cls_name` (a ViViT class) on (B, 4, 3, 32, 32) clips: 2 x 16 tubelets, width 32."""
    transformers = import_transformers()
    options = dict(
        image_size=32,
        num_frames=4,
        tubelet_size=[2, 8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return randomised(getattr(transformers, cls_name)(transformers.VivitConfig(**options | overrides)), seed)


def videomae(cls_name: str = "VideoMAEModel", *, seed: int = 0, **overrides) -> nn.Module:
    """transformers' `cls_name` (a VideoMAE class) on (B, 4, 3, 32, 32) clips: 32 tubelets, width 32;
    the pre-training decoder 24 wide with 3 heads."""
    transformers = import_transformers()
    options = dict(
        image_size=32,
        patch_size=8,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=3,
        decoder_intermediate_size=48,
    )
    return randomised(getattr(transformers, cls_name)(transformers.VideoMAEConfig(**options | overrides)), seed)


def vit_pytorch_vivit(variant: str, *, seed: int = 0, **overrides) -> nn.Module:
    """vit-pytorch's ViViT on (B, 3, 4, 32, 32) clips: width 32, heads * dim_head = 36 inside the attention."""
    vivit = import_vit_pytorch_vivit()
    options = dict(image_size=32, image_patch_size=8, frames=4, frame_patch_size=2, num_classes=5, dim=32)
    options |= dict(spatial_depth=2, temporal_depth=2, heads=3, mlp_dim=64, dim_head=12, variant=variant)
    return randomised(vivit.ViViT(**options | overrides), seed)


# ------------------------------------------------------------------------------ parity


def hidden(model, video):
    return model(video).last_hidden_state


def converted_layers(model: nn.Module) -> list[FactorisedAttention]:
    return [m for m in model.modules() if isinstance(m, FactorisedAttention)]


# Key biases (name suffix) and the sibling whose gradient sets the scale of their rounding noise.
_KEY_BIASES = (("k_norm.bias", "k_norm.weight"), ("k_proj.bias", "q_proj.bias"))


def gradient_error(name: str, grad: torch.Tensor, reference: dict[str, torch.Tensor]) -> float:
    """The relative error of the gradient of parameter `name` against `reference[name]`. A key bias
    shifts a query's scores all alike, so its true gradient is zero: both sides are rounding noise,
    measured against the scale of a sibling's gradient."""
    sibling = next((sibling for suffix, sibling in _KEY_BIASES if name.endswith(suffix)), None)
    if sibling is None:
        return relative_error(grad, reference[name])
    scale = reference[name.rsplit(".", 2)[0] + "." + sibling].abs().max()
    return ((grad - reference[name]).abs().max() / scale).item()


def assert_parity(original, inputs, forward, options, *, forward_converted=None, train=False) -> dict:
    """Convert a copy of `original`; outputs and every parameter gradient must match the original's.
    Returns the relative errors by name ("output", then the parameters)."""
    original.train(train)
    converted = convert(copy.deepcopy(original), **options)
    assert converted.training == train
    assert sum(p.numel() for p in converted.parameters()) == sum(p.numel() for p in original.parameters())
    expected = forward(original, inputs)
    actual = (forward_converted or forward)(converted, inputs)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (expected * grad).sum().backward()
    (actual * grad).sum().backward()
    errors = {"output": relative_error(actual, expected)}
    reference = {name: p.grad for name, p in original.named_parameters()}
    params = dict(converted.named_parameters())
    assert list(params) == list(reference)  # the original's parameters, by its names, in its order
    for name, p in params.items():
        if reference[name] is None:  # unused by `forward` (only part of the model ran)
            assert p.grad is None, f"{name} got a gradient the original's did not"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        errors[name] = gradient_error(name, p.grad, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"
    return errors
