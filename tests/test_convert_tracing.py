"""Converted models under graph capture: timm's FX feature extraction keeps a converted attention as
one leaf call and computes the model's outputs and gradients; TorchScript is refused (the converted
attention's forward is not scriptable), as docs/dropin.md says."""

from __future__ import annotations

import warnings

import pytest
import torch

from vivit_kernels import FactorisedAttention, convert

timm = pytest.importorskip("timm", reason="timm builds the ViT that is traced")
pytest.importorskip("torchvision.models.feature_extraction", reason="timm's FX feature extraction uses torchvision")

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def converted_timm_vit(memory: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny timm ViT, and a converted copy with the same weights."""
    torch.manual_seed(0)
    options = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    original = timm.models.vision_transformer.VisionTransformer(**options)
    model = timm.models.vision_transformer.VisionTransformer(**options)
    model.load_state_dict(original.state_dict())
    return original, convert(model, mode="joint", memory=memory)


@pytest.mark.parametrize("memory", [None, "lean"])
def test_timm_fx_feature_extraction_traces_a_converted_vit_with_its_attention_as_a_leaf(memory):
    """Converted, the attention is one leaf call; lean, the whole block is (it computes its
    LayerNorms inside the projections, branching on shapes)."""
    from timm.models import create_feature_extractor, get_graph_node_names

    original, model = converted_timm_vit(memory)
    train_nodes, eval_nodes = get_graph_node_names(model)
    leaf = "attn" if memory is None else ""
    assert {f"blocks.0.{leaf}".rstrip("."), f"blocks.1.{leaf}".rstrip(".")} <= set(eval_nodes)  # one call each
    assert not any(name.startswith(f"blocks.0.{leaf}".rstrip(".") + ".") for name in eval_nodes)
    images = torch.randn(2, 3, 32, 32)
    traced = create_feature_extractor(model.eval(), return_nodes=[eval_nodes[-1]])
    with torch.no_grad():
        (out,) = traced(images).values()
        torch.testing.assert_close(out, original.eval()(images), rtol=1e-5, atol=1e-6)

    traced = create_feature_extractor(model.train(), return_nodes=[train_nodes[-1]])
    original.train()
    for net in (traced, original):
        net.zero_grad()
    (out,) = traced(images).values()
    out.square().sum().backward()
    original(images).square().sum().backward()
    expected = dict(original.named_parameters())  # timm's parameter names are kept
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torchscript_of_a_converted_model_is_refused():
    _, model = converted_timm_vit()
    assert any(isinstance(m, FactorisedAttention) for m in model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with pytest.raises((torch.jit.frontend.FrontendError, RuntimeError)):
            torch.jit.script(model)
