"""Adapters on converted models: PEFT's LoRA finds the original's modules by their names in a
converted model and takes effect there as it does in the original.

Each family, built from a small random config, gets the same LoRA (random, so it changes the
function) on its attention projections, as a PEFT user targets them, and on MLP or output
projections; the converted model with the adapter must give the original-with-adapter's outputs
and adapter gradients, with and without memory="lean". The library's own ViViT likewise keeps an
adapter in effect under every memory policy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import relative_error

from support.convert_models import (
    TOLERANCE,
    hf_vivit,
    hidden,
    timesformer,
    timm_vit,
    videomae,
    vit_pytorch_vivit,
)
from vivit_kernels import convert

pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")

# family: (builder, convert options, forward, the modules a LoRA targets, input shape)
FAMILIES = {
    "timm": (timm_vit, dict(mode="joint"), lambda m, x: m(x[:, 0]), ["qkv", "fc1"], (2, 1, 3, 32, 32)),
    "hf_vivit": (hf_vivit, {}, hidden, ["q_proj", "v_proj", "fc2"], (2, 4, 3, 32, 32)),
    "videomae": (videomae, {}, hidden, ["query", "value", "dense"], (2, 4, 3, 32, 32)),
    "timesformer": (timesformer, {}, hidden, ["qkv", "dense"], (2, 3, 3, 32, 32)),
    "vit_pytorch": (
        lambda: vit_pytorch_vivit("factorized_encoder"),
        {},
        lambda m, x: m(x),
        ["to_qkv", "to_out.0"],
        (2, 3, 4, 32, 32),
    ),
}


def _with_lora(model: torch.nn.Module, targets: list[str]):
    peft = pytest.importorskip("peft", reason="PEFT adds the LoRA adapters")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("memory", [None, "lean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_originals_module_names(family, memory, generator):
    build, options, forward, targets, shape = FAMILIES[family]
    original = build().eval()
    converted = convert(copy.deepcopy(original), **options, memory=memory)
    video = torch.randn(shape, generator=generator)
    with torch.no_grad():
        plain = forward(converted, video)

    torch.manual_seed(0)
    adapted = _with_lora(original, targets)
    adapted_converted = _with_lora(converted, targets)
    # The same adapter weights, by the same names: the converted model's modules are the original's.
    adapted_converted.load_state_dict(adapted.state_dict(), strict=True)
    lora = {name: p for name, p in adapted.named_parameters() if p.requires_grad}
    lora_converted = {name: p for name, p in adapted_converted.named_parameters() if p.requires_grad}
    assert list(lora_converted) == list(lora) and any(".lora_A." in name for name in lora)
    assert any(f".{targets[0]}." in name for name in lora)

    expected, actual = forward(adapted, video), forward(adapted_converted, video)
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, plain) > 1e-3  # the adapter is in effect
    grad = torch.randn(expected.shape, generator=generator)
    (expected * grad).sum().backward()
    (actual * grad).sum().backward()
    for name, p in lora.items():
        assert relative_error(lora_converted[name].grad, p.grad) <= TOLERANCE, name


@pytest.mark.parametrize("memory", ["lean", "recompute_mlp"])
def test_lora_on_the_library_vivit_under_each_memory_policy(memory, generator):
    """The library's own ViViT with a LoRA on its qkv and MLP projections: a memory policy that
    fuses those products calls the wrapped ones as they are, so the outputs and adapter gradients
    are the default policy's."""
    vivit = pytest.importorskip("vivit", reason="the library's models package")
    config = dict(num_frames=4, img_size=32, tubelet=(2, 8, 8), dim=32, depth=2, num_heads=4, num_classes=3)
    torch.manual_seed(0)
    model = vivit.ViViT(vivit.ViViTConfig(variant="factorised_self_attention", **config)).eval()
    clip = torch.randn(2, 3, 4, 32, 32, generator=generator)
    results = []
    for policy in ("default", memory):
        torch.manual_seed(0)
        adapted = _with_lora(copy.deepcopy(model), ["qkv", "fc1", "fc2"])
        adapted.base_model.model.set_block_memory(policy)
        out = adapted(clip)
        out.square().sum().backward()
        results.append((out, {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}))
    (out, grads), (policy_out, policy_grads) = results
    assert relative_error(policy_out, out) <= TOLERANCE
    assert list(policy_grads) == list(grads) and any(".lora_B." in name for name in grads)
    for name, grad in grads.items():
        assert relative_error(policy_grads[name], grad) <= TOLERANCE, name
