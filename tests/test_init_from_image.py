"""Initialising ViViT from a pretrained image ViT (models/vivit/adapt.py, pretrained.py), ViViT
section 3.4. The image models are timm / Hugging Face ViTs with random weights, written to files
by the test and loaded from them, as a user would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error, require_transformers

from vivit import (
    ViViT,
    ViViTConfig,
    central_frame,
    image_to_video,
    inflate,
    load_image_pretrained,
    resample_pos_embed,
    tile_pos_embed,
)
from vivit_kernels import tubelet_embedding

timm = pytest.importorskip("timm", reason="timm builds the image ViTs these tests start from")

pytestmark = pytest.mark.filterwarnings("ignore:.*no fused backend fits")

TINY = dict(num_frames=8, img_size=32, tubelet=(2, 8, 8), dim=64, depth=2, num_heads=4, temporal_depth=2)


def timm_vit(class_token: bool = True, dim: int = 64, num_classes: int = 5, img_size: int = 32, **kwargs):
    """A timm ViT with random weights, every parameter non-trivial (pos embed, CLS, norms too)."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=dim,
        depth=2,
        num_heads=4,
        num_classes=num_classes,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        fc_norm=False,
        **kwargs,
    )
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save(state: dict, path, fmt: str):
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors writes and reads the .safetensors files")
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def vivit(variant: str, **overrides) -> ViViT:
    torch.manual_seed(1)
    return ViViT(ViViTConfig(variant=variant, num_classes=5, **{**TINY, **overrides})).eval()


def static_clip(image: torch.Tensor, frames: int = 8) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, frames, H, W): every frame the same image."""
    return image[:, :, None].expand(-1, -1, frames, -1, -1).contiguous()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_factorised_encoder_frames_equal_image_features(tmp_path, fmt, generator):
    """Model 2, central-frame tubelets, static clip: every frame's spatial-encoder output is the
    image ViT's pre-logits feature of that image."""
    image_model = timm_vit()
    path = save(image_model.state_dict(), tmp_path / f"vit.{fmt}", fmt)
    model = vivit("factorised_encoder")
    report = load_image_pretrained(model, path, tubelet_init="central_frame")
    assert "patch_embed.proj.weight" in report.adapted
    assert "temporal.blocks.0.attn.qkv.weight" in report.missing  # temporal encoder: random by default
    image = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        frames = model.frame_features(static_clip(image))
        expected = image_model.forward_head(image_model.forward_features(image), pre_logits=True)
    assert frames.shape == (2, 4, 64)
    assert relative_error(frames, expected[:, None].expand_as(frames)) < 1e-5


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_factorised_self_attention_tokens_equal_image_tokens(tmp_path, fmt, generator):
    """Model 3, temporal MSA zero-initialised, central-frame tubelets, static clip: the token
    features of each frame are the image ViT's token features."""
    image_model = timm_vit(class_token=False)
    path = save(image_model.state_dict(), tmp_path / f"vit.{fmt}", fmt)
    model = vivit("factorised_self_attention")
    report = load_image_pretrained(model, path, tubelet_init="central_frame")
    assert report.adapted["blocks.1.temporal_attn.proj.weight"].startswith("zero")
    assert report.adapted["blocks.0.temporal_attn.qkv.weight"] == "from blocks.0.attn.qkv.weight"
    assert "adapted blocks.{0-1}.temporal_attn.qkv.weight: from blocks.{0-1}.attn.qkv.weight" in str(report)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        tokens = model.forward_features(static_clip(image)).reshape(2, 4, 16, 64)
        expected = image_model.forward_features(image)  # (B, 16, D), normalised
    assert relative_error(tokens, expected[:, None].expand_as(tokens)) < 1e-5


def test_factorised_self_attention_temporal_qkv_moves_after_two_steps(tmp_path, generator):
    """From the image initialisation, the zeroed temporal output projection does not freeze the
    temporal q/k/v: they move by the second optimiser step."""
    model = vivit("factorised_self_attention").train()
    load_image_pretrained(model, save(timm_vit(class_token=False).state_dict(), tmp_path / "vit.pth", "pth"))
    qkv = [block.temporal_attn.qkv.weight for block in model.blocks]
    start = [w.detach().clone() for w in qkv]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    clip, labels = torch.randn(2, 3, 8, 32, 32, generator=generator), torch.tensor([1, 3])
    for _ in range(2):
        optimiser.zero_grad()
        F.cross_entropy(model(clip), labels).backward()
        optimiser.step()
    for w, w0 in zip(qkv, start):
        assert (w - w0).abs().max() > 1e-6


@pytest.mark.parametrize("t", [2, 3])
def test_inflate_on_static_clip_equals_2d_patch_embedding(tmp_path, t, generator):
    image_model = timm_vit()
    model = vivit("factorised_dot_product", tubelet=(t, 8, 8), num_frames=3 * t)
    report = load_image_pretrained(model, save(image_model.state_dict(), tmp_path / "vit.bin", "bin"), "inflate")
    assert report.adapted["patch_embed.proj.weight"] == f"inflate over t={t}"
    image = torch.randn(2, 3, 32, 32, generator=generator)
    proj = image_model.patch_embed.proj
    with torch.no_grad():
        tokens = model.patch_embed(static_clip(image, 3 * t))  # (B, 3, 16, D)
        expected = F.conv2d(image, proj.weight, proj.bias, stride=8).flatten(2).transpose(1, 2)
    assert relative_error(tokens, expected[:, None].expand_as(tokens)) < 1e-5


def test_hugging_face_vit_into_factorised_encoder(tmp_path, generator):
    """An HF ViTModel, from a safetensors file, into model 2: on a static clip each frame's
    spatial-encoder output is the HF model's CLS output of the image."""
    transformers = require_transformers("transformers builds the HF ViT")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    hf = transformers.ViTModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model = vivit("factorised_encoder")
    report = load_image_pretrained(model, save(hf.state_dict(), tmp_path / "vit.safetensors", "safetensors"), "inflate")
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.1.attn.qkv.weight"} <= set(report.loaded)
    assert set(report.skipped) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert {"head.weight", "head.bias", "temporal.pos_embed"} <= set(report.missing)
    image = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        frames = model.frame_features(static_clip(image))
        expected = hf(pixel_values=image).last_hidden_state[:, 0]
    assert relative_error(frames, expected[:, None].expand_as(frames)) < 1e-5


def test_factorised_encoder_temporal_from_image(tmp_path):
    image_model = timm_vit()
    model = vivit("factorised_encoder")
    path = save(image_model.state_dict(), tmp_path / "vit.safetensors", "safetensors")
    report = load_image_pretrained(model, path, temporal_encoder_init="image")
    torch.testing.assert_close(model.temporal.blocks[1].mlp.fc1.weight, image_model.blocks[1].mlp.fc1.weight)
    torch.testing.assert_close(model.temporal.norm.weight, image_model.norm.weight)
    assert sorted(report.missing) == ["temporal.cls_token", "temporal.pos_embed"]


def test_head_kept_only_when_class_count_matches(tmp_path):
    image_model = timm_vit(num_classes=5)
    path = save(image_model.state_dict(), tmp_path / "vit.pth", "pth")
    same = vivit("factorised_dot_product")
    report = load_image_pretrained(same, path)
    assert "head.weight" in report.loaded
    torch.testing.assert_close(same.head.weight, image_model.head.weight)
    torch.manual_seed(1)
    other = ViViT(ViViTConfig(variant="factorised_dot_product", num_classes=7, **TINY))
    before = other.head.weight.detach().clone()
    report = load_image_pretrained(other, path)
    assert "class count differs" in report.skipped["head.weight"]
    assert torch.equal(other.head.weight, before)


def test_fc_norm_image_model_warns_that_norm_stays_at_init(tmp_path):
    """timm ViTs with fc_norm normalise after pooling and leave `norm` an identity: our norm (before
    pooling) cannot take fc_norm's weights, stays at its initialisation, and the load says so."""
    image_model = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=5,
        class_token=False,
        global_pool="avg",
        fc_norm=True,
    )
    model = vivit("factorised_dot_product")
    with pytest.warns(
        UserWarning,
        match=r"load_image_pretrained: 2 parameter\(s\) left at their initial values "
        r"\(not in the checkpoint\): norm\.\*",
    ):
        report = load_image_pretrained(model, image_model.state_dict())
    assert "fc_norm" in report.skipped["fc_norm.weight"] and "norm.weight" in report.missing


def test_pos_embed_resampled_and_tiled():
    """A 4x4 image grid onto a 6x4 video grid of 4 frames: bilinear resample, then every frame
    holds the same grid; the CLS position is kept."""
    image_model = timm_vit()
    model = vivit("spatio_temporal", img_size=(48, 32))
    report = load_image_pretrained(model, image_model.state_dict())
    assert report.adapted["pos_embed"] == "resampled bilinearly 4x4 -> 6x4, tiled over 4 frames"
    pos = model.pos_embed.detach()
    source = image_model.pos_embed.detach()
    torch.testing.assert_close(pos[:, 0], source[:, 0])
    frames = pos[0, 1:].reshape(4, 24, 64)
    grid = F.interpolate(source[0, 1:].reshape(4, 4, 64).permute(2, 0, 1)[None], size=(6, 4), mode="bilinear")
    torch.testing.assert_close(frames, grid[0].permute(1, 2, 0).reshape(1, 24, 64).expand(4, -1, -1))


def test_pos_embed_helpers():
    grid = torch.randn(1, 6, 8)
    assert resample_pos_embed(grid, (2, 3), (2, 3)) is grid
    tiled = tile_pos_embed(grid, 3)
    assert tiled.shape == (1, 18, 8) and torch.equal(tiled[:, 12:], grid)
    # A constant embedding stays constant under bilinear resampling.
    assert torch.allclose(resample_pos_embed(torch.ones(1, 4, 8), (2, 2), (5, 3)), torch.ones(1, 15, 8))


@pytest.mark.parametrize(
    "image_kwargs, key, shapes",
    [
        (dict(dim=32), "cls_token", r"\(1, 1, 32\).*\(1, 1, 64\)"),
        (dict(mlp_ratio=2.0), "blocks.0.mlp.fc1.weight", r"\(128, 64\).*\(256, 64\)"),
    ],
)
def test_unadaptable_shape_raises_naming_key_and_shapes(tmp_path, image_kwargs, key, shapes):
    path = save(timm_vit(**image_kwargs).state_dict(), tmp_path / "vit.pth", "pth")
    with pytest.raises(ValueError, match=rf"'{key}'.*{shapes}"):
        load_image_pretrained(vivit("spatio_temporal"), path)


def test_patch_size_mismatch_raises(tmp_path):
    model = vivit("factorised_self_attention", tubelet=(2, 16, 16))
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight'.*\(64, 3, 8, 8\).*\(64, 3, 2, 16, 16\)"):
        load_image_pretrained(model, timm_vit(class_token=False).state_dict())


def test_bad_arguments(tmp_path):
    model = vivit("spatio_temporal")
    with pytest.raises(
        ValueError,
        match=r"^load_image_pretrained: tubelet_init must be one of 'central_frame', "
        r"'inflate', got 'average'$",
    ):
        load_image_pretrained(model, tmp_path / "absent.pth", tubelet_init="average")  # checked before reading
    with pytest.raises(
        ValueError,
        match=r"^image_to_video: temporal_encoder_init must be one of 'random', "
        r"'image', got 'copy'$",
    ):
        image_to_video({}, model.state_dict(), model.config, temporal_encoder_init="copy")
    with pytest.raises(FileNotFoundError):
        load_image_pretrained(model, tmp_path / "absent.pth")
    with pytest.raises(TypeError, match="ViViT"):
        load_image_pretrained(torch.nn.Linear(2, 2), {})


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_inflate_on_a_static_clip_is_the_2d_patch_embedding(t, generator):
    frame = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=generator)
    weight_2d = torch.randn(8, 3, 4, 4, dtype=torch.float64, generator=generator)
    bias = torch.randn(8, dtype=torch.float64, generator=generator)
    clip = frame.unsqueeze(2).expand(-1, -1, 2 * t, -1, -1)
    tokens = tubelet_embedding(clip, inflate(weight_2d, t), bias)
    patches = F.conv2d(frame, weight_2d, bias, stride=4).flatten(2).transpose(1, 2)  # (B, S, D)
    for nt in range(2):
        assert relative_error(tokens[:, nt], patches) < 1e-12


@pytest.mark.parametrize("t", [1, 2, 3, 4])
def test_central_frame_sees_only_the_centre_frame(t, generator):
    clip = torch.randn(1, 3, t, 8, 8, dtype=torch.float64, generator=generator)
    weight_2d = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=generator)
    tokens = tubelet_embedding(clip, central_frame(weight_2d, t))
    centre = F.conv2d(clip[:, :, t // 2], weight_2d, stride=4).flatten(2).transpose(1, 2)
    assert relative_error(tokens[:, 0], centre) < 1e-12
