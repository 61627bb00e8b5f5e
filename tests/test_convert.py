"""vivit_kernels.convert: each family built from a small random config, converted, and compared with
the original library's model in fp32 (outputs and every parameter gradient, <= 1e-5 relative) on
the cpu and reference backends; then what cannot be converted."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from support.convert_models import (
    assert_parity,
    converted_layers,
    hf_vivit,
    hidden,
    import_timm,
    import_transformers,
    randomised,
    timesformer,
    timm_vit,
    videomae,
    vit_pytorch_vivit,
)
from vivit_kernels import FactorisedAttention, convert

BACKENDS = ["cpu", "reference"]

pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")


# -------------------------------------------------------------------------------- timm ViT


TIMM_CONFIGS = {
    "class+registers, qk_norm, no proj bias": dict(reg_tokens=2, qk_norm=True, proj_bias=False, qkv_bias=True),
    "no class token, no qkv bias": dict(class_token=False, global_pool="avg", qkv_bias=False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", TIMM_CONFIGS)
@pytest.mark.parametrize("mode", ["joint", "spatial"])
def test_timm_vit_on_images(mode, config, backend, generator):
    """joint keeps the function; so does spatial on an image batch (one frame, every prefix token)."""
    model = timm_vit(**TIMM_CONFIGS[config])
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert_parity(model, images, lambda m, x: m(x), dict(mode=mode, backend=backend), train=True)
    layer = convert(copy.deepcopy(model), mode=mode).blocks[0].attn
    if config.startswith("class"):
        assert isinstance(layer.q_norm, nn.LayerNorm) and layer.proj.bias is None
    if mode == "spatial":
        assert (layer.num_prefix_tokens, layer.tokens_per_frame) == (model.num_prefix_tokens, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_attention_with_its_own_head_dim(backend, generator):
    """attn_head_dim: 4 heads of 16, an inner width of 64 in a 48-wide model."""
    timm = import_timm()
    model = timm_vit()
    for block in model.blocks:
        block.attn = timm.layers.Attention(48, num_heads=4, attn_head_dim=16, qkv_bias=True)
    randomised(model)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert_parity(model, images, lambda m, x: m(x), dict(mode="spatial", backend=backend))


def test_timm_vit_converts_in_place_reusing_parameters():
    model = timm_vit(qk_norm=True)
    qkv, q_norm = model.blocks[1].attn.qkv, model.blocks[1].attn.q_norm
    assert convert(model, mode="split") is model
    attn = model.blocks[1].attn
    assert type(attn) is FactorisedAttention and attn.qkv is qkv and attn.q_norm is q_norm
    assert "blocks.1.attn.qkv.weight" in model.state_dict()  # timm's names: its checkpoints still load


@pytest.mark.parametrize("backend", BACKENDS)
def test_timm_vit_spatial_over_frames_is_the_image_model_per_frame(backend, generator):
    """Without prefix tokens, spatial attention over a time-major (B, T * S, D) clip is the image
    ViT applied to each frame on its own."""
    model = timm_vit(class_token=False, global_pool="avg", qkv_bias=True)
    B, T, S, D = 2, 3, 16, 48
    tokens = torch.randn(B, T * S, D, generator=generator)
    assert_parity(
        model,
        tokens,
        forward=lambda m, x: m.blocks(x.reshape(B * T, S, D)).reshape(B, T * S, D),
        forward_converted=lambda m, x: m.blocks(x),
        options=dict(mode="spatial", backend=backend),
    )


def test_timm_vit_with_a_class_token_over_frames():
    """The default ViT (class token) on a clip: T is read off N = 1 + T * S; a count that fits no
    grid is an error naming N, P and S."""
    model = convert(timm_vit(), mode="split")
    assert model.blocks(torch.randn(2, 1 + 4 * 16, 48)).shape == (2, 65, 48)
    with pytest.raises(ValueError, match=r"N=64 tokens with num_prefix_tokens=1 .*tokens_per_frame=16"):
        model.blocks(torch.randn(2, 4 * 16, 48))


def test_timm_vit_refusals():
    timm = import_timm()
    with pytest.raises(ValueError, match="image model, so mode is required"):
        convert(timm_vit())
    with pytest.raises(ValueError, match="frames / tokens_per_frame have no meaning"):
        convert(timm_vit(), mode="joint", frames=8)
    with pytest.raises(
        ValueError, match=r"blocks\.0\.attn: FactorisedAttention: mode .split. needs an even number of heads"
    ):
        convert(timm_vit(num_heads=3), mode="split")
    with pytest.raises(ValueError, match="dynamic_img_size.* needs frames=T or tokens_per_frame=S"):
        convert(timm_vit(dynamic_img_size=True), mode="spatial")

    model = timm_vit()
    first = model.blocks[0].attn
    model.blocks[1].attn = timm.layers.Attention(48, num_heads=4, scale_norm=True, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn: scale_norm=True"):
        convert(model, mode="spatial")
    assert model.blocks[0].attn is first  # nothing was replaced
    model.blocks[1].attn = nn.Identity()
    with pytest.raises(
        ValueError, match=r"blocks\.1\.attn: Block has torch\.nn\.modules\.linear\.Identity; only timm's Attention"
    ):
        convert(model, mode="spatial")
    model = convert(timm_vit(), mode="spatial")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn is already a FactorisedAttention"):
        convert(model, mode="spatial")


# ---------------------------------------------------------------------- transformers TimeSformer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only", "joint_space_time"])
def test_timesformer(attention_type, backend, generator):
    model = timesformer(attention_type=attention_type)
    video = torch.randn(2, 3, 3, 32, 32, generator=generator)
    assert_parity(model, video, hidden, dict(backend=backend), train=True)


def test_timesformer_divided_layers():
    """Temporal then spatial FactorisedAttention on the whole space-major sequence, the class token
    as the prefix; the original's modules reused; gradient checkpointing still applies."""
    transformers = import_transformers()
    model = timesformer()
    qkv = model.encoder.layer[0].temporal_attention.attention.qkv
    convert(model)
    layer = model.encoder.layer[0]
    assert isinstance(layer, transformers.models.timesformer.modeling_timesformer.TimesformerLayer)
    temporal, spatial = layer.temporal_attention, layer.attention
    assert (temporal.mode, spatial.mode) == ("temporal", "spatial") and temporal.attention.qkv is qkv
    for attn in (temporal, spatial):
        assert (attn.layout, attn.num_prefix_tokens, attn.frames) == ("space_major", 1, 3)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored.encoder.layer[0]) is type(layer)

    calls = []
    temporal.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    # transformers 5 renamed it; older versions have only the old name.
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model(torch.randn(1, 3, 3, 32, 32)).last_hidden_state.sum().backward()
    assert len(calls) == 2  # the forward, and its replay in backward


def test_timesformer_clip_length_from_tokens_per_frame():
    """With tokens_per_frame, T is read off each input: a 5-frame clip runs through a model
    configured for 3 (the original layer would misread it)."""
    model = convert(timesformer(), tokens_per_frame=16)
    x = torch.randn(2, 1 + 16 * 5, 32)
    assert model.encoder(x).last_hidden_state.shape == x.shape


def test_timesformer_drop_path_is_drawn_per_group():
    """Training with stochastic depth: each temporal residual group (sample, position) and each
    spatial one (sample, frame) is kept or dropped whole, as in the original's batches."""
    transformers = import_transformers()
    model = timesformer(num_hidden_layers=1)
    # (The config types drop_path_rate as an int, so the layer's module is set directly.)
    model.encoder.layer[0].drop_path = transformers.models.timesformer.modeling_timesformer.TimesformerDropPath(0.5)
    layer = convert(model).train().encoder.layer[0]
    B, S, T, D = 8, 16, 3, 32
    x = torch.randn(B, 1 + S * T, D)
    inputs = {}
    for name in ("temporal_dense", "layernorm_before", "layernorm_after"):
        getattr(layer, name).register_forward_hook(lambda m, args, out, name=name: inputs.setdefault(name, args[0]))
    layer(x)
    temporal = inputs["temporal_dense"].reshape(B, S, T, D)  # the temporal residual, before temporal_dense
    spatial = (inputs["layernorm_after"] - inputs["layernorm_before"])[:, 1:].reshape(B, S, T, D)
    for residual, group_axis, other_axis in ((temporal, 2, 1), (spatial, 1, 2)):
        dropped = (residual == 0).all(-1)  # (B, S, T)
        # Whole groups go together, and groups of one sample are drawn independently.
        assert (dropped == dropped.narrow(group_axis, 0, 1)).all()
        mixed = dropped.any(other_axis) & ~dropped.all(other_axis)
        assert mixed.any()


def test_timesformer_refusals():
    with pytest.raises(ValueError, match="TimeSformer keeps its own attention pattern, so mode must be None"):
        convert(timesformer(), mode="spatial")
    with pytest.raises(ValueError, match="frames / tokens_per_frame have no meaning"):
        convert(timesformer(attention_type="space_only"), frames=3)
    model = convert(timesformer())
    with pytest.raises(ValueError, match="TimesformerLayer .*output_attentions=True is not supported"):
        model(torch.randn(1, 3, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match="found no TimesformerLayer to convert"):
        convert(model)
    space_only = convert(timesformer(attention_type="space_only"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention is converted already"):
        convert(space_only)


# --------------------------------------------------------------------------- transformers ViViT


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_vivit(backend, generator):
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    assert_parity(hf_vivit(), video, hidden, dict(backend=backend), train=True)
    assert_parity(
        hf_vivit("VivitForVideoClassification", num_labels=5, qkv_bias=False),
        video,
        lambda m, x: m(x).logits,
        dict(backend=backend, mode="joint"),
    )


def test_hf_vivit_refusals():
    with pytest.raises(ValueError, match="mode must be None or 'joint', got 'split'"):
        convert(hf_vivit(), mode="split")
    model = convert(hf_vivit())
    assert all([w.shape for w in layer.qkv_weights] == [(32, 32)] * 3 for layer in converted_layers(model))
    with pytest.raises(ValueError, match="VivitAttention .*output_attentions=True is not supported"):
        model(torch.randn(1, 4, 3, 32, 32), output_attentions=True)


# ------------------------------------------------------------------------ transformers VideoMAE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qv_bias", [True, False])
def test_videomae(qv_bias, backend, generator):
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    assert_parity(videomae(qv_bias=qv_bias), video, hidden, dict(backend=backend), train=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_videomae_pretraining_encoder_and_decoder(backend, generator):
    """The pre-training model: visible tokens only in the encoder, all of them in the decoder."""
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    masked = torch.zeros(2, 32, dtype=torch.bool)
    masked[:, ::3] = True
    model = videomae("VideoMAEForPreTraining")
    errors = assert_parity(model, video, lambda m, x: m(x, bool_masked_pos=masked).logits, dict(backend=backend))
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in errors


def test_videomae_key_bias_is_zero_and_never_trained():
    model = convert(videomae())
    layer = converted_layers(model)[0]
    assert not [name for name, _ in model.named_parameters() if "key.bias" in name or "k_bias" in name]
    assert not [name for name, _ in model.named_buffers()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(1, 4, 3, 32, 32)).last_hidden_state.sum().backward()
    optimizer.step()
    inner = layer.attention.query.bias.shape[0]
    assert (layer.qkv_bias[inner : 2 * inner] == 0).all() and layer.attention.query.bias.grad is not None


# ------------------------------------------------------------------------ vit-pytorch ViViT


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("variant", ["factorized_encoder", "factorized_self_attention"])
def test_vit_pytorch_vivit(variant, pool, backend, generator):
    """Inner width heads * dim_head = 36 != dim = 32; pre-LayerNorm inside the attention."""
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    assert_parity(vit_pytorch_vivit(variant, pool=pool), video, lambda m, x: m(x), dict(backend=backend), train=True)


def test_vit_pytorch_single_head_has_no_output_projection(generator):
    model = vit_pytorch_vivit("factorized_self_attention", heads=1, dim_head=32)
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    assert_parity(model, video, lambda m, x: m(x), dict(backend="reference"))


def test_vit_pytorch_modes_and_refusals():
    model = convert(vit_pytorch_vivit("factorized_self_attention"))
    assert [m.mode for m in converted_layers(model)] == ["spatial", "temporal"] * 2
    with pytest.raises(ValueError, match="FactorizedTransformer .*an attention mask is not supported"):
        model(torch.randn(1, 3, 4, 32, 32), mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mode must be None, got 'joint'"):
        convert(vit_pytorch_vivit("factorized_encoder"), mode="joint")


# ------------------------------------------------------------------------------- any model


def test_attention_dropout_is_the_originals_module_or_rate():
    """Each converted layer's `attn_drop` is an nn.Dropout with the original's rate (timm's own module)."""
    timm_model = timm_vit(attn_drop_rate=0.1)
    timm_modules = [block.attn.attn_drop for block in timm_model.blocks]
    hf = dict(attention_probs_dropout_prob=0.1)
    models = {
        "timm": convert(timm_model, mode="split"),
        "timesformer": convert(timesformer(**hf)),
        "hf_vivit": convert(hf_vivit(**hf)),
        "videomae": convert(videomae(**hf)),
        "vit_pytorch": convert(
            vit_pytorch_vivit(
                "factorized_self_attention", spatial_depth=1, temporal_depth=1, heads=2, dim_head=16, dropout=0.1
            )
        ),
    }
    for family, model in models.items():
        layers = converted_layers(model)
        assert layers and all(isinstance(m.attn_drop, nn.Dropout) and m.attn_drop.p == 0.1 for m in layers), family
    assert all(block.attn.attn_drop is module for block, module in zip(timm_model.blocks, timm_modules, strict=True))


def test_unknown_models_and_arguments():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.container\.Sequential is not a model convert knows"):
        convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(
        ValueError,
        match=r"^convert: mode must be one of 'joint', 'spatial', 'temporal', 'split', "
        r"None, got 'diagonal'$",
    ):
        convert(timm_vit(), mode="diagonal")
    with pytest.raises(
        ValueError,
        match=r"^convert: backend must be one of 'auto', 'reference', 'triton', "
        r"'cpu', 'sdpa', got 'cuda'$",
    ):
        convert(timm_vit(), mode="joint", backend="cuda")
