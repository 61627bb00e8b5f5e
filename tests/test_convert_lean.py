"""convert(model, memory="lean"): each family's blocks recompute their LayerNorms and GELU in backward.
Outputs and every parameter gradient equal the original library's model (test_convert's parity check,
train and eval), masks and dropout behave as before, the state dict is the original's, and the bytes
saved for backward drop by exactly what is no longer kept."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import relative_error
from torch import nn

from support.convert_models import (
    assert_parity,
    gradient_error,
    hf_vivit,
    hidden,
    import_timm,
    import_transformers,
    import_vit_pytorch_vivit,
    randomised,
    timesformer,
    timm_vit,
    videomae,
    vit_pytorch_vivit,
)
from vivit_kernels import convert, saved_bytes
from vivit_kernels.convert import lean as lean_layers  # its family classes import their library when read

pytestmark = pytest.mark.usefixtures("cpu_kernels", "one_thread")

FP32 = 4


def lean(**options) -> dict:
    return options | dict(memory="lean")


def freed_bytes(
    original,
    inputs,
    forward,
    options,
    *,
    tokens: int,
    dim: int,
    hidden: int,
    blocks: int,
    gelu: int = 1,
    norms: int = 2,
):
    """Bytes saved for backward by the converted model minus the lean one; checked against the count,
    per token per block: each of the `norms` LayerNorms' output (D) and its mean and rstd (2 floats),
    and the `gelu` hidden-wide tensors the unfused activation keeps beyond its input (its output for
    torch's GELU; seven intermediates for transformers' `gelu_fast` formula; 0 where it stays unfused)."""
    converted = convert(copy.deepcopy(original), **options).train()
    lean_model = convert(copy.deepcopy(original), **lean(**options)).train()
    freed = saved_bytes(forward, converted, inputs) - saved_bytes(forward, lean_model, inputs)
    assert freed == blocks * tokens * (norms * (dim + 2) + gelu * hidden) * FP32
    return freed


def call(model, inputs):
    return model(inputs)


# ------------------------------------------------------------------------------------ timm ViT


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "config",
    [
        dict(reg_tokens=2, qk_norm=True, proj_bias=False, qkv_bias=True, init_values=0.5),
        dict(class_token=False, global_pool="avg", qkv_bias=False),
    ],
)
@pytest.mark.parametrize("mode", ["joint", "spatial"])
def test_timm_vit_lean_is_the_original(mode, config, train, generator):
    model = timm_vit(**config)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert_parity(model, images, lambda m, x: m(x), lean(mode=mode, backend="cpu"), train=train)
    assert all(
        type(block) is lean_layers.TimmLeanBlock for block in convert(timm_vit(**config), **lean(mode=mode)).blocks
    )


def test_timm_vit_lean_honours_attn_mask(generator):
    mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    mask[1, ..., 9:] = False
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert_parity(timm_vit(), images, lambda m, x: m(x, attn_mask=mask), lean(mode="joint"), train=True)


def test_timm_vit_lean_saves_less():
    images = torch.randn(2, 3, 32, 32)
    sizes = dict(tokens=2 * 17, dim=48, hidden=4 * 48, blocks=2)
    freed_bytes(timm_vit(), images, lambda m, x: m(x), dict(mode="joint"), **sizes)
    freed_bytes(timm_vit(), images, lambda m, x: m(x), dict(mode="split"), **sizes)
    # An activation gelu_linear does not compute stays unfused: its output is kept, as the original keeps it.
    relu = timm_vit(act_layer=nn.ReLU)
    assert_parity(relu, images, lambda m, x: m(x), lean(mode="joint"), train=True)
    freed_bytes(relu, images, lambda m, x: m(x), dict(mode="joint"), **sizes, gelu=0)


def test_timm_vit_lean_refusals_leave_the_model_as_it_was():
    timm = import_timm()
    model = timm_vit(mlp_layer=timm.layers.GluMlp, mlp_ratio=2)
    with pytest.raises(ValueError, match=r"blocks.0.mlp: memory='lean' rewrites timm's Mlp without a hidden norm"):
        convert(model, mode="joint", memory="lean")
    assert type(model.blocks[0].attn) is timm.models.vision_transformer.Attention
    with pytest.raises(ValueError, match=r"blocks.0.norm1: memory='lean' fuses a LayerNorm .*RmsNorm"):
        convert(timm_vit(norm_layer=timm.layers.RmsNorm), mode="joint", memory="lean")
    lean_model = convert(timm_vit(), mode="joint", memory="lean")
    with pytest.raises(ValueError, match="is_causal=True: attn_mask / is_causal are not supported"):
        lean_model(torch.randn(1, 3, 32, 32), is_causal=True)


# --------------------------------------------------------------------------- transformers ViViT


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("hidden_act", ["gelu_fast", "gelu"])
def test_hf_vivit_lean_is_the_original(hidden_act, train, generator):
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    model = hf_vivit("VivitForVideoClassification", num_labels=5, hidden_act=hidden_act)
    assert_parity(model, video, lambda m, x: m(x).logits, lean(), train=train)
    converted = convert(copy.deepcopy(model), **lean())
    assert all(type(layer) is lean_layers.VivitLeanLayer for layer in converted.vivit.layers)
    assert lean_layers.gelu_approximate(converted.vivit.layers[0].mlp.activation_fn) == (
        "tanh" if hidden_act == "gelu_fast" else "none"
    )


def test_hf_vivit_lean_padding_mask(generator):
    mask = torch.ones(2, 1 + 2 * 16, dtype=torch.long)
    mask[1, 17:] = 0
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    assert_parity(hf_vivit(), video, lambda m, x: m(x, attention_mask=mask).last_hidden_state, lean(), train=True)


def test_hf_vivit_lean_saves_less():
    video = torch.randn(2, 4, 3, 32, 32)
    sizes = dict(tokens=2 * 33, dim=32, hidden=64, blocks=2)
    freed_bytes(hf_vivit(), video, hidden, {}, **sizes, gelu=7)  # gelu_fast
    freed_bytes(hf_vivit(hidden_act="gelu"), video, hidden, {}, **sizes)
    freed_bytes(hf_vivit(hidden_act="quick_gelu"), video, hidden, {}, **sizes, gelu=0)


# ------------------------------------------------------------------------ transformers VideoMAE


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("qv_bias", [True, False])
def test_videomae_lean_is_the_original(qv_bias, train, generator):
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    assert_parity(videomae(qv_bias=qv_bias), video, hidden, lean(), train=train)


def test_videomae_pretraining_lean_encoder_and_decoder(generator):
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    masked = torch.zeros(2, 32, dtype=torch.bool)
    masked[:, ::3] = True
    model = videomae("VideoMAEForPreTraining")
    assert_parity(model, video, lambda m, x: m(x, bool_masked_pos=masked).logits, lean(), train=True)
    converted = convert(model, memory="lean")
    assert type(converted.decoder.decoder_layers[0]) is lean_layers.VideoMAELeanLayer


def test_videomae_lean_saves_less():
    video = torch.randn(2, 4, 3, 32, 32)
    freed_bytes(videomae(), video, hidden, {}, tokens=2 * 32, dim=32, hidden=64, blocks=2)


# ---------------------------------------------------------------------- transformers TimeSformer


def timesformer_dropping() -> nn.Module:
    """Every dropout of a TimeSformer active, and drop path (set on the module: the config types its rate as an int)."""
    transformers = import_transformers()
    model = timesformer(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    for layer in model.encoder.layer:
        layer.drop_path = transformers.models.timesformer.modeling_timesformer.TimesformerDropPath(0.3)
    return model


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only", "joint_space_time"])
def test_timesformer_lean_is_the_original(attention_type, train, generator):
    video = torch.randn(2, 3, 3, 32, 32, generator=generator)
    model = timesformer(attention_type=attention_type)
    assert_parity(model, video, hidden, lean(backend="cpu"), train=train)
    converted = convert(copy.deepcopy(model), **lean())
    divided = attention_type == "divided_space_time"
    lean_class = lean_layers.TimesformerLeanDividedLayer if divided else lean_layers.TimesformerLeanLayer
    assert all(type(layer) is lean_class for layer in converted.encoder.layer)


def test_timesformer_lean_under_gradient_checkpointing(generator):
    """transformers' checkpointing of the layer replays the lean forward: the same gradients."""
    video = torch.randn(2, 3, 3, 32, 32, generator=generator)
    model = convert(timesformer(), **lean()).train()
    checkpointed = copy.deepcopy(model)
    # transformers 5 renamed it; older versions have only the old name.
    (getattr(checkpointed, "activation_checkpointing_enable", None) or checkpointed.gradient_checkpointing_enable)()
    calls = []
    checkpointed.encoder.layer[0].temporal_dense.register_forward_hook(lambda *_: calls.append(1))
    for m in (model, checkpointed):
        hidden(m, video).square().sum().backward()
    assert len(calls) == 2  # the forward, and its replay in backward
    for p, q in zip(model.parameters(), checkpointed.parameters(), strict=True):
        assert relative_error(q.grad, p.grad) <= 1e-6


@pytest.mark.parametrize("hidden_act", ["gelu_new", "quick_gelu"])
def test_timesformer_classifier_lean_is_the_original(hidden_act, generator):
    """The task model, without qkv biases; a tanh GELU fused, an activation gelu_linear does not compute kept."""
    video = torch.randn(2, 3, 3, 32, 32, generator=generator)
    model = timesformer("TimesformerForVideoClassification", num_labels=5, qkv_bias=False, hidden_act=hidden_act)
    assert_parity(model, video, lambda m, x: m(x).logits, lean(), train=True)


def test_timesformer_lean_saves_less():
    video = torch.randn(2, 3, 3, 32, 32)
    sizes = dict(dim=32, hidden=64, blocks=2)
    joint = dict(tokens=2 * (1 + 3 * 16), **sizes)
    # Divided: the temporal LayerNorm as well (over every token, the class token's row included).
    freed_bytes(timesformer(), video, hidden, {}, **joint, norms=3)
    freed_bytes(timesformer(attention_type="joint_space_time"), video, hidden, {}, **joint)
    freed_bytes(timesformer(attention_type="space_only"), video, hidden, {}, tokens=2 * 3 * (1 + 16), **sizes)
    # Dropout between the activation and output.dense in training: the GELU stays unfused.
    freed_bytes(timesformer(hidden_dropout_prob=0.1), video, hidden, {}, **joint, norms=3, gelu=0)


# ---------------------------------------------------------------------------- vit-pytorch ViViT


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "config", [dict(pool="cls"), dict(pool="mean", heads=1, dim_head=32)], ids=["cls", "mean-one-head"]
)
@pytest.mark.parametrize("variant", ["factorized_encoder", "factorized_self_attention"])
def test_vit_pytorch_lean_is_the_original(variant, config, train, generator):
    """Inner width 36 != dim 32 (cls), or one head as wide as dim with no output projection (mean)."""
    vivit_pytorch = import_vit_pytorch_vivit()
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    model = vit_pytorch_vivit(variant, **config)
    assert_parity(model, video, lambda m, x: m(x), lean(backend="cpu"), train=train)
    converted = convert(copy.deepcopy(model), **lean())
    classes = {type(m) for m in converted.modules()}
    assert {lean_layers.VitPytorchLeanAttention, lean_layers.VitPytorchLeanFeedForward} <= classes
    assert not classes & {vivit_pytorch.FeedForward, vivit_pytorch.Attention}


def test_vit_pytorch_lean_temporal_mask(generator):
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    model = vit_pytorch_vivit("factorized_encoder")
    assert_parity(model, video, lambda m, x: m(x, mask=mask), lean(), train=True)


def vit_pytorch_dropping(variant: str) -> nn.Module:
    return vit_pytorch_vivit(variant, dropout=0.2)


@pytest.mark.filterwarnings("ignore:attention_packed. no fused backend fits")
def test_vit_pytorch_lean_saves_less():
    video = torch.randn(2, 3, 4, 32, 32)
    sizes = dict(dim=32, hidden=64, blocks=2)
    # Per layer: spatial and temporal attention (a LayerNorm each) and the feed-forward, on B * T * (1 + n) tokens.
    grid = dict(tokens=2 * 2 * (1 + 16), norms=3, **sizes)
    freed_bytes(vit_pytorch_vivit("factorized_self_attention"), video, call, {}, **grid)
    # Two transformers as deep: B * T sequences of 1 + n tokens, then B of 1 + T.
    freed_bytes(vit_pytorch_vivit("factorized_encoder"), video, call, {}, tokens=2 * 2 * 17 + 2 * 3, **sizes)
    # Dropout between the GELU and the second Linear in training: the GELU stays unfused.
    freed_bytes(vit_pytorch_dropping("factorized_self_attention"), video, call, {}, **grid, gelu=0)


# --------------------------------------------------------------------------------- every family


@pytest.mark.filterwarnings("ignore:attention_packed. no fused backend fits")
@pytest.mark.parametrize(
    "build, forward, options",
    [
        (
            lambda: timm_vit(proj_drop_rate=0.2, attn_drop_rate=0.2, drop_path_rate=0.3, init_values=0.5),
            lambda m, x: m(x.flatten(1, 2)[:, :3]),
            dict(mode="joint"),
        ),
        (lambda: hf_vivit(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), hidden, {}),
        (lambda: videomae(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2), hidden, {}),
        (timesformer_dropping, lambda m, x: hidden(m, x[:, :3]), {}),
        (lambda: vit_pytorch_dropping("factorized_encoder"), lambda m, x: m(x.transpose(1, 2)), {}),
        (lambda: vit_pytorch_dropping("factorized_self_attention"), lambda m, x: m(x.transpose(1, 2)), {}),
    ],
    ids=["timm", "vivit", "videomae", "timesformer", "vit-pytorch-encoder", "vit-pytorch-self-attention"],
)
def test_lean_dropout_and_drop_path_draw_as_before(build, forward, options, generator):
    """In training with every dropout and drop path (timm: and layer scale), the lean blocks draw the
    same randomness in the same order as the converted ones: same seed, same outputs and gradients."""
    model = build().train()
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    results = []
    for memory in (None, "lean"):
        converted = convert(copy.deepcopy(model), **options, memory=memory)
        torch.manual_seed(3)
        out = forward(converted, video)
        out.square().sum().backward()
        results.append((out, {name: p.grad for name, p in converted.named_parameters()}))
    (out, grads), (lean_out, lean_grads) = results
    assert relative_error(lean_out, out) <= 1e-6
    assert list(lean_grads) == list(grads)
    for name, grad in grads.items():
        assert (lean_grads[name] is None) == (grad is None)
        assert grad is None or gradient_error(name, lean_grads[name], grads) <= 1e-5, name
    torch.manual_seed(4)
    assert relative_error(forward(converted, video), lean_out) > 1e-3  # the dropouts are active


@pytest.mark.parametrize(
    "build, options",
    [
        (lambda: timm_vit(reg_tokens=2), dict(mode="joint")),
        (lambda: hf_vivit("VivitForVideoClassification", num_labels=5), {}),
        (lambda: videomae("VideoMAEForPreTraining"), {}),
        (lambda: timesformer("TimesformerForVideoClassification", num_labels=5), {}),
        (lambda: timesformer(attention_type="space_only"), {}),
        (lambda: vit_pytorch_vivit("factorized_encoder"), {}),
        (lambda: vit_pytorch_vivit("factorized_self_attention"), {}),
    ],
    ids=["timm", "vivit", "videomae", "timesformer", "timesformer-joint", "vit-pytorch-encoder", "vit-pytorch-fsa"],
)
def test_lean_keeps_the_state_dict_and_pickles(build, options):
    original = build()
    converted = convert(copy.deepcopy(original), **lean(**options))
    state = converted.state_dict()
    assert list(state) == list(original.state_dict())
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())
    copy.deepcopy(converted).load_state_dict(original.state_dict(), strict=True)
    restored = pickle.loads(pickle.dumps(converted))
    assert [type(m) for m in restored.modules()] == [type(m) for m in converted.modules()]


def test_lean_refusals():
    with pytest.raises(ValueError, match=r"^convert: memory must be one of None, 'lean', got 'bogus'$"):
        convert(timm_vit(), mode="joint", memory="bogus")
    unfusable = timesformer()
    unfusable.encoder.layer[1].temporal_layernorm = nn.RMSNorm(32)
    self_attention = vit_pytorch_vivit("factorized_self_attention")
    self_attention.factorized_transformer.layers[0][1].norm = nn.RMSNorm(32)
    encoder = vit_pytorch_vivit("factorized_encoder")
    encoder.temporal_transformer.layers[1][1].net.insert(3, nn.Dropout(0.1))
    for model, message in (
        (unfusable, r"encoder.layer.1.temporal_layernorm: memory='lean' fuses a LayerNorm .*RMSNorm"),
        (self_attention, r"factorized_transformer.layers.0.1.norm: memory='lean' fuses a LayerNorm .*RMSNorm"),
        (encoder, r"temporal_transformer.layers.1.1.net: memory='lean' rewrites vit-pytorch's FeedForward .*got 7"),
    ):
        before = [type(m) for m in model.modules()]
        with pytest.raises(ValueError, match=message):
            convert(model, memory="lean")
        assert [type(m) for m in model.modules()] == before


def test_lean_without_memory_keeps_the_family_classes():
    transformers = import_transformers()
    model = convert(randomised(hf_vivit()))
    assert type(model.layers[0]) is transformers.models.vivit.modeling_vivit.VivitLayer
