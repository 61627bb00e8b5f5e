"""Fine-tuning from a video model (models/vivit/pretrained.py: load_video_pretrained, read_pretrained;
adapt.py: resample_video_pos_embed, video_to_video): a Hugging Face ViViT save_pretrained
directory or a vivit-train checkpoint, onto other clips or classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import relative_error, require_transformers

from vivit import ViViT, ViViTConfig, hf_to_timm, load_image_pretrained, load_video_pretrained, model_spec
from vivit.adapt import resample_video_pos_embed
from vivit.checkpoint import save_checkpoint
from vivit.pretrained import read_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:.*no fused backend fits")


def interp_axis(values: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear resampling of one axis to `size` samples at the new cells' centres (half-pixel
    convention, edges held): the 1-D rule a video resampling applies along t, h and w in turn."""
    n = values.shape[axis]
    centres = (np.arange(size) + 0.5) * n / size - 0.5
    return np.apply_along_axis(lambda line: np.interp(centres, np.arange(n), line), axis, values)


@pytest.mark.parametrize("old, new", [((4, 3, 5), (6, 2, 5)), ((2, 4, 4), (5, 4, 4)), ((1, 4, 4), (1, 6, 3))])
def test_resample_video_pos_embed_resamples_time_and_space_separately(old, new, generator):
    """Against a float64 oracle that interpolates t, h and w one after another: positions of one
    frame never mix with another frame's except through the time axis (HF's square-grid
    interpolation of all t*h*w positions would)."""
    D = 3
    pos = torch.randn(1, 1 + int(np.prod(old)), D, dtype=torch.float64, generator=generator)
    out = resample_video_pos_embed(pos, old, new, num_prefix_tokens=1)
    grid = pos[0, 1:].reshape(*old, D).numpy()
    for axis, size in enumerate(new):
        grid = interp_axis(grid, axis, size)
    assert out.shape == (1, 1 + int(np.prod(new)), D)
    assert torch.equal(out[:, :1], pos[:, :1])  # the CLS position is kept
    assert relative_error(out[0, 1:], torch.from_numpy(grid.reshape(-1, D))) < 1e-6
    assert resample_video_pos_embed(pos, old, old, 1) is pos


transformers = require_transformers("transformers builds the Hugging Face ViViT")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small HF ViViT (8 frames of 32 x 48, 2 x 8 x 8 tubelets, 5 labels) in a save_pretrained directory."""
    config = transformers.VivitConfig(
        image_size=[32, 48],
        num_frames=8,
        tubelet_size=[2, 8, 8],
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    torch.manual_seed(0)
    hf = transformers.VivitForVideoClassification(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path_factory.mktemp("hf_vivit")
    hf.save_pretrained(path)
    return path, hf


def spatio_temporal(**overrides) -> ViViT:
    fields = dict(
        variant="spatio_temporal",
        num_classes=5,
        img_size=(32, 48),
        num_frames=8,
        tubelet=(2, 8, 8),
        dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        mlp_activation="gelu_tanh",
    )
    torch.manual_seed(1)
    return ViViT(ViViTConfig(**{**fields, **overrides})).eval()


def test_hf_directory_on_the_same_grid_with_other_classes(hf_dir, generator):
    """Everything but the head loads as it is (same token features as transformers); the head of
    another class count stays the model's new one, reported and warned about."""
    path, hf = hf_dir
    model = spatio_temporal(num_classes=3)
    head = model.head.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"2 parameter\(s\) left at their initial values .*: head\.\*"):
        report = load_video_pretrained(model, path)
    assert "a new head" in report.skipped["head.weight"] and torch.equal(model.head.weight, head)
    assert not report.adapted and not report.missing
    clip = torch.randn(2, 8, 3, 32, 48, generator=generator)
    with torch.no_grad():
        expected = hf.vivit(pixel_values=clip).last_hidden_state
        tokens = model.forward_features(clip.permute(0, 2, 1, 3, 4))
    assert relative_error(tokens, expected) < 1e-5


def test_hf_directory_onto_other_frames_and_size(hf_dir):
    """16 frames of 48 x 48: the positional embedding is resampled as a video, 4x4x6 -> 8x6x6;
    every other weight is the checkpoint's."""
    path, hf = hf_dir
    model = spatio_temporal(num_frames=16, img_size=(48, 48))
    report = load_video_pretrained(model, path)
    assert report.adapted == {"pos_embed": "resampled over time and space, 4x4x6 -> 8x6x6 (t x h x w)"}
    source = hf.vivit.embeddings.position_embeddings.detach()
    torch.testing.assert_close(model.pos_embed.detach(), resample_video_pos_embed(source, (4, 4, 6), (8, 6, 6), 1))
    converted, _ = hf_to_timm(hf.state_dict())
    for key in ("blocks.1.attn.qkv.weight", "blocks.0.mlp.fc2.bias", "patch_embed.proj.weight", "head.weight"):
        assert torch.equal(model.state_dict()[key], converted[key]), key


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(dim=64, num_heads=4), r"dim 32 vs 64, num_heads 2 vs 4"),
        (dict(mlp_activation="gelu"), r"mlp_activation 'gelu_tanh' vs 'gelu'"),
    ],
)
def test_another_architecture_is_refused_naming_the_fields(hf_dir, overrides, named):
    with pytest.raises(ValueError, match=rf"differs from this one: {named} \(checkpoint vs model\)"):
        load_video_pretrained(spatio_temporal(**overrides), hf_dir[0])


def test_a_hf_vivit_state_dict_without_its_config_is_refused(hf_dir):
    with pytest.raises(ValueError, match="without its config.json"):
        read_pretrained(hf_dir[1].state_dict())


def test_vivit_train_checkpoint_of_model_2_onto_more_frames(tmp_path):
    """Model 2 keeps one frame's spatial grid (its pos_embed loads unchanged) and resamples the
    temporal encoder's positions linearly in time, 4 -> 8 frame positions."""
    tiny = dict(img_size=32, num_frames=8, tubelet=(2, 8, 8), dim=32, depth=2, num_heads=2, temporal_depth=1)
    spec = model_spec("vivit_b", "factorised_encoder", 5, **tiny)
    torch.manual_seed(0)
    source = ViViT(ViViTConfig(variant="factorised_encoder", num_classes=5, **tiny))
    path = save_checkpoint(
        {"model": source.state_dict(), "model_spec": spec, "classes": list("abcde")}, tmp_path / "c.pt"
    )
    model = ViViT(ViViTConfig(variant="factorised_encoder", num_classes=5, **{**tiny, "num_frames": 16}))
    report = load_video_pretrained(model, path)
    assert "pos_embed" in report.loaded and torch.equal(model.pos_embed, source.pos_embed)
    assert report.adapted == {"temporal.pos_embed": "resampled over time and space, 4x1x1 -> 8x1x1 (t x h x w)"}
    expected = resample_video_pos_embed(source.temporal.pos_embed.detach(), (4, 1, 1), (8, 1, 1), 1)
    assert torch.equal(model.temporal.pos_embed.detach(), expected)
    with pytest.raises(ValueError, match="is a video model .*load_video_pretrained"):
        load_image_pretrained(model, path)
