"""Import of Hugging Face ViViT checkpoints (`VivitForVideoClassification`) into model 1
(models/vivit/pretrained.py: load_hf_vivit, vivit_config_from_hf; adapt.py: hf_to_timm)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import relative_error, require_transformers

from vivit import ViViT, ViViTConfig, load_hf_vivit, vivit_config_from_hf

transformers = require_transformers("transformers builds the reference HF ViViT")

pytestmark = pytest.mark.filterwarnings("ignore:.*no fused backend fits")


def hf_vivit(num_labels: int = 5, **config_kwargs):
    """A small HF ViViT (uneven 32x48 frames) with random weights, every parameter non-trivial."""
    config = transformers.VivitConfig(
        **{
            "image_size": [32, 48],
            "num_frames": 8,
            "tubelet_size": [2, 8, 8],
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 192,
            "num_labels": num_labels,
            **config_kwargs,
        }
    )
    torch.manual_seed(0)
    model = transformers.VivitForVideoClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("layout", ["save_pretrained", "state_dict_bin"])
def test_logits_match(tmp_path, layout, generator):
    """Same logits as transformers in fp32, from the hub's file layout (save_pretrained:
    safetensors, query/key/value names) and from transformers 5's own state dict in a .bin."""
    hf = hf_vivit()
    if layout == "save_pretrained":  # config.json read as a dict, weights from the directory
        hf.save_pretrained(tmp_path)
        source, config = tmp_path, json.loads((tmp_path / "config.json").read_text())
    else:
        source, config = tmp_path / "vivit.bin", hf.config
        torch.save(hf.state_dict(), source)
    model = ViViT(vivit_config_from_hf(config)).eval()
    assert model.config.img_size == (32, 48) and model.config.mlp_ratio == 3.0
    report = load_hf_vivit(model, source)
    assert len(report.loaded) == len(model.state_dict()) and not report.missing and not report.skipped
    assert model.config.mlp_activation == "gelu_tanh"
    clip = torch.randn(2, 8, 3, 32, 48, generator=generator)  # HF takes (B, T, C, H, W)
    with torch.no_grad():
        expected = hf(pixel_values=clip).logits
        logits = model(clip.permute(0, 2, 1, 3, 4))
    assert relative_error(logits, expected) < 1e-5


def test_honours_the_checkpoints_exact_gelu(tmp_path, generator):
    """A checkpoint whose config.json says hidden_act "gelu" (exact) keeps exact GELU: forcing HF
    ViViT's usual tanh form would move the logits by ~5e-4. The model's config is not changed."""
    hf = hf_vivit(hidden_act="gelu")
    hf.save_pretrained(tmp_path)
    model = ViViT(vivit_config_from_hf(json.loads((tmp_path / "config.json").read_text()))).eval()
    before = copy.deepcopy(model.config)
    load_hf_vivit(model, tmp_path)
    assert model.config == before and model.config.mlp_activation == "gelu"
    clip = torch.randn(1, 8, 3, 32, 48, generator=generator)
    with torch.no_grad():
        assert relative_error(model(clip.permute(0, 2, 1, 3, 4)), hf(pixel_values=clip).logits) < 1e-5


@pytest.mark.parametrize(
    "hf_kwargs, model_overrides, named",
    [
        # 16 frames of 16 x 48 and 8 of 32 x 48 both make 48 tubelets: only the config tells them apart.
        (
            dict(num_frames=16, image_size=[16, 48]),
            dict(num_frames=8, img_size=(32, 48)),
            r"img_size \(16, 48\) vs \(32, 48\), num_frames 16 vs 8",
        ),
        (dict(hidden_act="gelu"), dict(mlp_activation="gelu_tanh"), r"mlp_activation 'gelu' vs 'gelu_tanh'"),
    ],
    ids=["same-token-count-other-grid", "activation"],
)
def test_refuses_a_model_other_than_the_checkpoints_config(tmp_path, hf_kwargs, model_overrides, named):
    hf = hf_vivit(**hf_kwargs)
    hf.save_pretrained(tmp_path)
    model = ViViT(vivit_config_from_hf(hf.config, **model_overrides))
    with pytest.raises(ValueError, match=rf"config differs from the model's: {named} \(checkpoint vs model\)"):
        load_hf_vivit(model, tmp_path)
    with pytest.raises(ValueError, match=named):  # the config passed with a bare state dict is compared too
        load_hf_vivit(model, hf.state_dict(), config=hf.config)


def test_other_class_count_skips_head():
    hf = hf_vivit(num_labels=5)
    model = ViViT(vivit_config_from_hf(hf.config, num_classes=3))
    report = load_hf_vivit(model, hf.state_dict())
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert "blocks.1.attn.qkv.weight" in report.loaded


def test_shape_mismatch_names_key_and_shapes():
    hf = hf_vivit()
    model = ViViT(vivit_config_from_hf(hf.config, num_frames=16))
    with pytest.raises(ValueError, match=r"'pos_embed'.*\(1, 97, 64\).*\(1, 193, 64\)"):
        load_hf_vivit(model, hf.state_dict())


def test_config_refuses_unknown_activation():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        vivit_config_from_hf({"hidden_act": "relu"})


def test_refuses_other_variants_and_layouts():
    hf = hf_vivit()
    config = vivit_config_from_hf(hf.config)
    with pytest.raises(ValueError, match="variant='factorised_dot_product'"):
        load_hf_vivit(ViViT(ViViTConfig(**{**vars(config), "variant": "factorised_dot_product", "pooling": "avg"})), {})
    with pytest.raises(ValueError, match="not a Hugging Face ViViT"):
        load_hf_vivit(ViViT(config), {"patch_embed.proj.weight": torch.zeros(1)})
    state = {k: v for k, v in hf.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="lacks 12 model weight"):
        load_hf_vivit(ViViT(config), state)
