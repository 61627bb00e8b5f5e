"""The ViViT variants (models/vivit/model.py, layers.py, config.py) on tiny configs."""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error

from vivit import PRESETS, VARIANTS, ViViT, ViViTConfig, build_model, create_model, preset_config

# On a machine without a fused backend for the input, "auto" runs the reference ops and says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*no fused backend fits")

TINY = dict(num_frames=8, img_size=(32, 48), tubelet=(2, 8, 8), dim=64, depth=2, num_heads=4, temporal_depth=2)


def tiny(variant: str, **overrides) -> ViViT:
    torch.manual_seed(0)
    return ViViT(ViViTConfig(variant=variant, num_classes=5, **{**TINY, **overrides}))


def video(batch: int, frames: int = 8, size=(32, 48), generator=None) -> torch.Tensor:
    return torch.randn(batch, 3, frames, *size, generator=generator)


@pytest.mark.parametrize("tokeniser", ["tubelet", "uniform"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 3])
def test_forward_backward(variant, tokeniser, batch, generator):
    # Uniform sampling takes any clip length: 13 frames in, 8 sampled.
    model = tiny(variant, tokeniser=tokeniser)
    clip = video(batch, 13 if tokeniser == "uniform" else 8, generator=generator)
    logits = model(clip)
    assert logits.shape == (batch, 5)
    logits.square().sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    # Every parameter takes part: none has an all-zero gradient, except model 3's zero-initialised
    # temporal MSA (its qkv and LayerNorm get gradient only once the output projection has moved).
    starts_idle = ("temporal_attn.qkv", "temporal_norm")
    dead = [n for n, p in model.named_parameters() if not p.grad.abs().sum() and not any(s in n for s in starts_idle)]
    assert not dead


@pytest.mark.parametrize("variant", VARIANTS)
def test_feature_shapes(variant, generator):
    model = tiny(variant).eval()
    nt, nh, nw = 4, 4, 6
    features = model.forward_features(video(2, generator=generator))
    expected = {
        "spatio_temporal": (2, 1 + nt * nh * nw, 64),
        "factorised_encoder": (2, 1 + nt, 64),
        "factorised_self_attention": (2, nt * nh * nw, 64),
        "factorised_dot_product": (2, nt * nh * nw, 64),
    }[variant]
    assert features.shape == expected
    assert model.forward_head(features, pre_logits=True).shape == (2, 64)
    torch.testing.assert_close(model.forward_head(features), model(video(2, generator=generator.manual_seed(0))))


def test_factorised_encoder_frame_features(generator):
    model = tiny("factorised_encoder", pooling="avg").eval()
    assert model.cls_token is None and model.temporal.cls_token is None
    assert model.frame_features(video(3, generator=generator)).shape == (3, 4, 64)
    with pytest.raises(ValueError, match="factorised_encoder"):
        tiny("spatio_temporal").frame_features(video(1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_checkpointing_matches(variant, generator):
    model = tiny(variant, drop_path_rate=0.1)
    clip = video(2, generator=generator)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)  # the same stochastic-depth draws both times
        out = model(clip)
        out.sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, checkpointed in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(plain, checkpointed)


def test_grad_checkpointing_config_flag():
    assert tiny("factorised_dot_product", grad_checkpointing=True).grad_checkpointing
    model = tiny("factorised_dot_product")
    model.set_grad_checkpointing()  # on, unless told otherwise; the model and its config agree, as bools
    assert model.grad_checkpointing is True and model.config.grad_checkpointing is True
    model.set_grad_checkpointing(0)
    assert model.grad_checkpointing is False and model.config.grad_checkpointing is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_dropout_only_in_training(variant, generator):
    model = tiny(variant, drop_rate=0.3, attn_drop_rate=0.2, drop_path_rate=0.3)
    clip = video(2, generator=generator)
    model.eval()
    torch.testing.assert_close(model(clip), model(clip), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(clip), model(clip))


@pytest.mark.parametrize("variant", VARIANTS)
def test_auto_backend_matches_reference(variant, generator):
    # Whatever backend "auto" picks on this machine, the model computes the reference's function.
    auto = tiny(variant).eval()
    reference = tiny(variant, backend="reference").eval()
    reference.load_state_dict(auto.state_dict())
    clip = video(2, generator=generator)
    assert relative_error(auto(clip), reference(clip)) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(variant, generator):
    model = tiny(variant, tokeniser="uniform" if variant == "factorised_encoder" else "tubelet")
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    clip, labels = video(4, generator=generator), torch.tensor([0, 1, 2, 3])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(clip), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_factorised_self_attention_temporal_qkv_learns(generator):
    """The temporal MSA starts as the identity (output projection zero) yet its q/k/v train:
    zero gradient in step one, moved after step two."""
    model = tiny("factorised_self_attention")
    clip = video(2, generator=generator)
    for block in model.blocks:
        assert not block.temporal_attn.proj.weight.any() and not block.temporal_attn.proj.bias.any()
    qkv = [block.temporal_attn.qkv.weight for block in model.blocks]
    start = [w.detach().clone() for w in qkv]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        optimiser.zero_grad()
        model(clip).square().mean().backward()
        if step == 0:
            assert all(not w.grad.any() for w in qkv)
        optimiser.step()
    for w, w0 in zip(qkv, start):
        assert (w - w0).abs().max() > 1e-5


def test_attention_order():
    model = tiny("factorised_self_attention")
    other = tiny("factorised_self_attention", attention_order="time_space")
    for block in (*model.blocks, *other.blocks):
        torch.nn.init.normal_(block.temporal_attn.proj.weight, std=0.2)
    other.load_state_dict(model.state_dict())
    clip = video(1)
    assert not torch.allclose(model(clip), other(clip))


def test_dot_product_has_model_1_parameter_count():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tiny("factorised_dot_product", pooling="avg")) == count(tiny("spatio_temporal", pooling="avg"))


def test_uniform_sampling_eval_is_deterministic_and_train_jitters(generator):
    model = tiny("factorised_dot_product", tokeniser="uniform")
    assert model.config.tubelet == (1, 8, 8) and model.grid == (8, 4, 6)
    clip = video(1, 40, generator=generator)
    model.eval()
    torch.testing.assert_close(model(clip), model(clip), rtol=0, atol=0)
    model.train()
    outputs = [model(clip) for _ in range(4)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_mlp_activation():
    exact, tanh = tiny("spatio_temporal"), tiny("spatio_temporal", mlp_activation="gelu_tanh")
    assert exact.blocks[0].mlp.act.approximate == "none" and tanh.blocks[0].mlp.act.approximate == "tanh"
    assert all(m.eps == 1e-6 for m in exact.modules() if isinstance(m, torch.nn.LayerNorm))


def test_stochastic_depth_rises_linearly():
    model = tiny("spatio_temporal", depth=3, drop_path_rate=0.2)
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])


def test_presets():
    assert set(PRESETS) == {"vivit_b", "vivit_l", "vivit_h"}
    with torch.device("meta"):
        model = create_model("vivit_b", variant="factorised_dot_product", num_classes=10, num_frames=16)
    c = model.config
    assert (c.dim, c.depth, c.num_heads, c.img_size, c.tubelet, c.num_frames) == (
        768,
        12,
        12,
        (224, 224),
        (2, 16, 16),
        16,
    )
    assert c.pooling == "avg" and model.head.out_features == 10
    with torch.device("meta"):
        default = create_model()  # ViViT-B model 1 for Kinetics-400
    assert (default.config.dim, default.config.depth, default.config.variant) == (768, 12, "spatio_temporal")
    assert default.head.out_features == 400
    assert model.blocks[0].mlp.fc1.out_features == 3072
    with torch.device("meta"):
        large = create_model("vivit_l")
        huge = create_model("vivit_h", variant="factorised_encoder")
    assert (large.config.dim, large.config.depth, large.config.num_heads, large.config.num_frames) == (1024, 24, 16, 32)
    assert (huge.config.dim, huge.config.depth, huge.config.tubelet, len(huge.temporal.blocks)) == (
        1280,
        32,
        (2, 14, 14),
        4,
    )
    assert huge.blocks[0].mlp.fc1.out_features == 5120


@pytest.mark.parametrize("tokeniser", ["tubelet", "uniform"])
def test_config_settings_reach_every_layer(tokeniser):
    """The config's dropout rates and backend are what each block and the embedding run with."""
    from torch import nn

    from vivit_kernels import FactorisedAttention

    model = tiny(
        "factorised_self_attention", drop_rate=0.3, attn_drop_rate=0.2, tokeniser=tokeniser, backend="reference"
    )
    assert model.patch_embed.backend == "reference"
    attentions = [m for m in model.modules() if isinstance(m, FactorisedAttention)]
    assert len(attentions) == 2 * TINY["depth"]
    assert all(a.backend == "reference" and a.attn_drop.p == 0.2 for a in attentions)
    attention_dropouts = {id(a.attn_drop) for a in attentions}
    dropouts = [m.p for m in model.modules() if isinstance(m, nn.Dropout) and id(m) not in attention_dropouts]
    assert dropouts and set(dropouts) == {0.3}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="model_5"), "variant"),
        (dict(variant="factorised_self_attention", pooling="cls"), "no CLS token"),
        (dict(variant="factorised_dot_product", num_heads=3, dim=48), "even"),
        (dict(dim=65), "divisible"),
        (dict(tokeniser="frames"), "tokeniser"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(img_size=(32, 0)), "img_size"),
        (dict(num_frames=1), "shorter than the tubelet"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViViTConfig(**{**TINY, **kwargs})


def test_config_and_keyword_arguments_are_not_mixed():
    with pytest.raises(
        TypeError, match=r"^ViViT: pass either a ViViTConfig or its fields as keyword arguments, not both$"
    ):
        ViViT(ViViTConfig(**TINY), depth=2)
    with pytest.raises(TypeError, match=r"^ViViT: config must be a ViViTConfig, got dict$"):
        ViViT(dict(TINY))


@pytest.mark.parametrize("variant", VARIANTS)
def test_position_embeddings_start_as_a_small_normal(variant):
    """Every pos_embed (the temporal encoder's too) is drawn at std 0.02, not left at zero."""
    torch.manual_seed(0)
    tables = {name: p for name, p in tiny(variant).named_parameters() if name.endswith("pos_embed")}
    assert tables
    for name, table in tables.items():
        assert 0.01 < table.std().item() < 0.03 and table.abs().max().item() < 0.2, name


def test_build_model_applies_changes_to_the_spec():
    """A checkpoint's model_spec rebuilt with changes (the CLIs' --backend, --memory, ...): the
    changes win over the spec's overrides, the rest comes from the spec."""
    from vivit.model import model_spec

    spec = model_spec(
        "vivit_b",
        "factorised_encoder",
        5,
        dim=32,
        depth=1,
        num_heads=2,
        temporal_depth=1,
        num_frames=4,
        img_size=32,
        tubelet=(2, 16, 16),
    )
    model = build_model(spec, depth=3, memory="lean")
    assert (model.config.depth, model.config.memory, model.config.temporal_depth) == (3, "lean", 1)
    assert model.config.variant == "factorised_encoder" and model.config.dim == 32
    assert len(model.blocks) == 3 and model.config.num_classes == 5


def test_bad_preset_and_override():
    with pytest.raises(ValueError, match="preset"):
        create_model("vivit_xl")
    with pytest.raises(TypeError, match="embed_dim"):
        create_model("vivit_b", embed_dim=64)


def test_wrong_video_shape():
    model = tiny("spatio_temporal")
    with pytest.raises(ValueError, match=r"\(4, 4, 6\) grid"):
        model(video(1, 6))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 8, 32, 48))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.randn(3, 8, 32, 48))


def test_config_fields_reach_every_block_and_the_head():
    """Each ViViTConfig field the blocks take is passed on (none left at a block's default), and
    num_classes=0 leaves features out; keyword arguments build the config."""
    model = ViViT(
        variant="factorised_self_attention",
        num_classes=0,
        mlp_ratio=2,
        qkv_bias=False,
        norm_eps=1e-5,
        memory="lean",
        **TINY,
    )
    assert isinstance(model.head, torch.nn.Identity) and model.config.num_classes == 0
    for block in model.blocks:
        assert block.mlp.fc1.out_features == 2 * 64 and block.attn.qkv.bias is None and block.lean
        assert all(m.eps == 1e-5 for m in block.modules() if isinstance(m, torch.nn.LayerNorm))
    assert model(video(1)).shape == (1, 64)


def test_initial_class_tokens_and_biases():
    """timm's start: class tokens (1, 1, D) drawn at std 1e-6, linear biases zero."""
    torch.manual_seed(0)
    model = tiny("factorised_encoder", depth=1, temporal_depth=1)
    for token in (model.cls_token, model.temporal.cls_token):
        assert token.shape == (1, 1, 64) and 0 < token.std().item() < 1e-5
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(not b.any() for b in biases)


def test_a_video_the_model_cannot_take_is_named():
    model = tiny("spatio_temporal")
    with pytest.raises(ValueError, match=r"^ViViT: video must be 5-D \(B, C, T, H, W\), got shape \(3, 8, 32, 48\)$"):
        model(torch.zeros(3, 8, 32, 48))
    with pytest.raises(TypeError, match=r"^ViViT: video must be a torch.Tensor, got list$"):
        model([1, 2])
    with pytest.raises(TypeError, match=r"^ViViT: video must have a floating dtype, got torch.uint8$"):
        model(torch.zeros(1, 3, 8, 32, 48, dtype=torch.uint8))
    with pytest.raises(
        ValueError,
        match=r"^ViViT: video of shape \(1, 1, 8, 32, 48\) gives a \(4, 4, 6\) token grid "
        r"with 1 channels; this model takes 3 channels and a \(4, 4, 6\) grid",
    ):
        model(torch.zeros(1, 1, 8, 32, 48))


def test_uniform_sampling_takes_the_configured_frames_and_patches():
    model = tiny("spatio_temporal", tokeniser="uniform", num_frames=4, tubelet=(1, 8, 16)).eval()
    assert model.grid == (4, 4, 3) and model.patch_embed.grid(16, 32, 48) == (4, 4, 3)
    assert model(video(1, frames=16)).shape == (1, 5)


def test_no_weight_decay_names_the_embeddings_and_class_tokens():
    model = tiny("factorised_encoder", depth=1, temporal_depth=1)
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "temporal.pos_embed", "temporal.cls_token"}


def test_an_unknown_preset_is_named():
    with pytest.raises(
        ValueError,
        match=r"^preset_config: name must be one of 'vivit_b', 'vivit_l', 'vivit_h', "
        r"got 'vivit_x'$",
    ):
        preset_config("vivit_x")
