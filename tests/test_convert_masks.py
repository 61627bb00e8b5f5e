"""Masks and attention weights: FactorisedAttention's joint mode against a float64 einsum oracle
with bool, additive and key-padding masks; converted models against their original library's
model on the same masked input (outputs and input gradient); torch.export of converted models;
output_attentions refused however it is requested."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import relative_error
from torch import nn

from support.convert_models import hf_vivit, randomised, timesformer, timm_vit, videomae, vit_pytorch_vivit
from vivit_kernels import FactorisedAttention, convert

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5
REFUSED = "converted by vivit_kernels.*output_attentions=True is not supported; the fused attention never forms"


def assert_masked_parity(original: nn.Module, converted: nn.Module, inputs: torch.Tensor, forward) -> None:
    """`forward(model, inputs)` of both models in fp32: outputs and the gradient of `inputs` equal."""
    results = []
    for model in (original, converted):
        x = inputs.clone().requires_grad_()
        out = forward(model, x)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        results.append((out.detach(), x.grad))
    (expected, expected_grad), (actual, actual_grad) = results
    assert relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual_grad, expected_grad) <= TOLERANCE


def assert_exports(model: nn.Module, args: tuple, kwargs: dict | None = None, read=lambda out: out) -> None:
    """torch.export.export runs on `model`, and the exported program computes what the model does."""
    model.eval()
    program = torch.export.export(model, args, kwargs=kwargs)
    with torch.no_grad():
        expected, actual = read(model(*args, **(kwargs or {}))), read(program.module()(*args, **(kwargs or {})))
    assert relative_error(actual, expected) <= TOLERANCE


# ------------------------------------------------------------------ FactorisedAttention, joint mode

B, N, D, H = 2, 197, 48, 4


def joint_attention(qk_norm: bool = False) -> FactorisedAttention:
    return randomised(FactorisedAttention(D, H, mode="joint", frames=1, qk_norm=qk_norm, backend="reference"))


def oracle(attn: FactorisedAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The layer in float64 with plain einsums: x (B, N, D), mask bool (True attends) or additive."""
    B, N, _ = x.shape
    Dh = attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * (attn.scale or Dh**-0.5)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
    return attn.proj(out.transpose(1, 2).reshape(B, N, H * Dh))


def masks(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each with the diagonal attending, so no query loses every key."""
    eye = torch.eye(N, dtype=torch.bool)
    padding = torch.ones(B, 1, 1, N, dtype=torch.bool)
    padding[1, ..., 150:] = False
    additive = torch.randn(B, H, N, N, generator=generator)
    additive[torch.rand(B, H, N, N, generator=generator) < 0.3] = float("-inf")
    return {
        "bool (B, 1, N, N)": (torch.rand(B, 1, N, N, generator=generator) < 0.6) | eye,
        "bool (N, N)": (torch.rand(N, N, generator=generator) < 0.6) | eye,
        "additive (B, H, N, N)": additive.masked_fill(eye, 0.0),
        "key padding (B, 1, 1, N)": padding,
    }


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize(
    "kind", ["bool (B, 1, N, N)", "bool (N, N)", "additive (B, H, N, N)", "key padding (B, 1, 1, N)"]
)
def test_joint_mask_against_float64_oracle(kind, qk_norm, generator):
    """fp32 forward and the gradients of x and of every parameter (qkv, proj, q/k norms) against float64."""
    attn = joint_attention(qk_norm)
    exact = copy.deepcopy(attn).double()
    mask = masks(generator)[kind]
    x = torch.randn(B, N, D, generator=generator, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out, expected = attn(x, attn_mask=mask), oracle(exact, x64, mask if mask.dtype == torch.bool else mask.double())
    grad = torch.randn(B, N, D, generator=generator)
    out.backward(grad)
    expected.backward(grad.double())
    assert relative_error(out, expected) <= TOLERANCE
    assert relative_error(x.grad, x64.grad) <= TOLERANCE
    reference = dict(exact.named_parameters())
    for name, p in attn.named_parameters():
        if name == "k_norm.bias":  # shifts a query's scores all alike: its true gradient is zero
            continue
        assert relative_error(p.grad, reference[name].grad) <= TOLERANCE, name
    unmasked = attn(x)
    assert relative_error(unmasked, out) > 1e-2  # the mask changed the result


def test_joint_mask_on_a_grid_input_and_a_float_mask_in_the_input_dtype(generator):
    """A (B, T, S, D) input: N = T * S; a float64 additive mask is cast to the scores' dtype."""
    attn = joint_attention()
    x = torch.randn(B, 4, 49, D, generator=generator, dtype=torch.float64)
    mask = torch.zeros(B, 1, 1, 196, dtype=torch.float64)
    mask[0, ..., :10] = float("-inf")
    with torch.no_grad():
        out = attn.double()(x, attn_mask=mask)
        assert relative_error(out, oracle(attn, x.reshape(B, 196, D), mask).reshape(x.shape)) <= TOLERANCE
        x32 = x.float()
        assert attn.float()(x32, attn_mask=mask).dtype == torch.float32


def test_masked_calls_use_the_modules_scale_and_dropout(generator):
    attn = randomised(FactorisedAttention(D, H, mode="joint", frames=1, scale=0.05, attn_drop=0.5))
    x = torch.randn(B, N, D, generator=generator, dtype=torch.float64)
    mask = masks(generator)["key padding (B, 1, 1, N)"]
    with torch.no_grad():
        attn.double().eval()
        assert relative_error(attn(x, attn_mask=mask), oracle(attn, x, mask)) <= TOLERANCE
        dropped = attn.train()(x, attn_mask=mask)
        assert relative_error(dropped, attn.eval()(x, attn_mask=mask)) > 1e-2


def test_unmasked_calls_keep_the_fused_path(monkeypatch, generator):
    """No mask (None): the backend's op runs, never torch SDPA; numerics as before."""
    attn = joint_attention()
    x = torch.randn(B, N, D, generator=generator)

    def sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran on an unmasked call")

    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    with torch.no_grad():
        assert attn(x).shape == x.shape
        with pytest.raises(AssertionError, match="SDPA ran"):
            attn(x, attn_mask=torch.ones(B, 1, 1, N, dtype=torch.bool))


@pytest.mark.parametrize("mode", ["spatial", "temporal", "split"])
def test_factorised_modes_refuse_a_mask(mode):
    attn = FactorisedAttention(D, H, mode=mode, frames=4)
    with pytest.raises(ValueError, match=rf"attn_mask is honoured in mode='joint' only; in mode '{mode}' the mode is"):
        attn(torch.randn(B, 4 * 49, D), attn_mask=torch.ones(B, 1, 1, 4 * 49, dtype=torch.bool))


def test_bad_masks_say_what_was_expected():
    attn = joint_attention()
    x = torch.randn(B, N, D)
    expected = r"\(B, H, N, N\) = \(2, 4, 197, 197\); expected a shape broadcastable to them with the N=197 keys last"
    for shape in [(B, N), (B, 1, 1, N - 1), (3, 1, 1, N), (B, 2, N, N), (N,), (1, B, 1, 1, N)]:
        with pytest.raises(ValueError, match=rf"attn_mask of shape \({', '.join(map(str, shape))},?\) does not fit"):
            attn(x, attn_mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=expected):
        attn(x, attn_mask=torch.ones(B, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool .* or floating .*, got torch.int64"):
        attn(x, attn_mask=torch.ones(B, 1, 1, N, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor .*, got list"):
        attn(x, attn_mask=[[True] * N])
    with pytest.raises(
        ValueError, match="is_causal=True: attn_mask / is_causal are not supported beyond a mask in mode='joint'"
    ):
        attn(x, is_causal=True)


# ------------------------------------------------------------------------------------ timm ViT


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["key padding", "additive"])
def test_timm_joint_honours_attn_mask(kind, backend, generator, request):
    """timm's forward(x, attn_mask=...) reaches every block's attention; converted with mode='joint' it is honoured."""
    if backend == "cpu":
        request.getfixturevalue("cpu_kernels")
    original = timm_vit(reg_tokens=2).eval()
    converted = convert(copy.deepcopy(original), mode="joint", backend=backend)
    n = 3 + 16
    if kind == "key padding":
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        mask[1, ..., 10:] = False
    else:
        mask = torch.randn(2, 1, n, n, generator=generator)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    assert_masked_parity(original, converted, images, lambda m, x: m(x, attn_mask=mask))
    assert relative_error(converted(images, attn_mask=mask), converted(images)) > 1e-3


def test_timm_factorised_modes_refuse_attn_mask():
    model = convert(timm_vit().eval(), mode="split")
    with pytest.raises(ValueError, match="honoured in mode='joint' only; in mode 'split' the mode is the mask"):
        model(torch.randn(1, 3, 32, 32), attn_mask=torch.ones(1, 1, 1, 17, dtype=torch.bool))


# ---------------------------------------------------------------------- transformers ViViT


def padding_mask() -> torch.Tensor:
    """Two clips of a 4-frame (2 tubelets of 16 tokens) batch: the second is one tubelet long, padded."""
    mask = torch.ones(2, 1 + 2 * 16, dtype=torch.long)
    mask[1, 17:] = 0
    return mask


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hf_vivit_padding_mask(attn_implementation, generator):
    """VivitModel(attention_mask=(B, N) padding): HF's mask helper builds a 4-D bool (sdpa) or
    additive (eager) mask; the converted model gives the original's outputs and input gradient."""
    original = hf_vivit(attn_implementation=attn_implementation).eval()
    converted = convert(copy.deepcopy(original))
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    mask = padding_mask()
    assert_masked_parity(original, converted, video, lambda m, x: m(x, attention_mask=mask).last_hidden_state)
    unmasked = converted(video).last_hidden_state
    assert relative_error(converted(video, attention_mask=mask).last_hidden_state[1], unmasked[1]) > 1e-3


def test_hf_vivit_task_model_passes_the_mask_through_its_kwargs(generator):
    original = hf_vivit("VivitForVideoClassification", num_labels=5).eval()
    converted = convert(copy.deepcopy(original))
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    mask = padding_mask()
    assert_masked_parity(original, converted, video, lambda m, x: m(x, attention_mask=mask).logits)


def test_hf_vivit_layer_takes_a_2d_padding_mask_and_refuses_other_objects(generator):
    """A (B, N) integer mask (transformers' flash-attention form) is key padding, as its 4-D form."""
    layer = convert(hf_vivit().eval()).layers[0].attention
    x = torch.randn(2, 33, 32, generator=generator)
    mask = padding_mask()
    with torch.no_grad():
        expected = layer(x, mask[:, None, None, :].bool())[0]
        assert torch.equal(layer(x, mask)[0], expected)
    with pytest.raises(TypeError, match=r"VivitAttention \(converted by vivit_kernels\): an attention mask of type"):
        layer(x, object())


def test_hf_vivit_exports(generator):
    """Under torch.export transformers builds an all-visible mask even when none is given."""
    model = convert(hf_vivit().eval())
    video = torch.randn(2, 4, 3, 32, 32, generator=generator)
    assert_exports(model, (video,), read=lambda out: out.last_hidden_state)
    assert_exports(model, (video,), dict(attention_mask=padding_mask()), read=lambda out: out.last_hidden_state)


# ------------------------------------------------------------------- transformers VideoMAE, TimeSformer


def test_videomae_exports(generator):
    model = convert(videomae().eval())
    assert_exports(model, (torch.randn(2, 4, 3, 32, 32, generator=generator),), read=lambda out: out.last_hidden_state)


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_timesformer_exports(attention_type, generator):
    model = convert(timesformer(attention_type=attention_type).eval())
    assert_exports(model, (torch.randn(2, 3, 3, 32, 32, generator=generator),), read=lambda out: out.last_hidden_state)


FAMILIES = {
    "ViViT": (hf_vivit, "VivitModel", "VivitForVideoClassification", (2, 4, 3, 32, 32)),
    "VideoMAE": (videomae, "VideoMAEModel", "VideoMAEForVideoClassification", (2, 4, 3, 32, 32)),
    "TimeSformer divided": (timesformer, "TimesformerModel", "TimesformerForVideoClassification", (2, 3, 3, 32, 32)),
    "TimeSformer joint": (timesformer, "TimesformerModel", "TimesformerForVideoClassification", (2, 3, 3, 32, 32)),
}


def build(family: str, task: bool = False, **config):
    make, base, task_class, shape = FAMILIES[family]
    if family == "TimeSformer joint":
        config["attention_type"] = "joint_space_time"
    model = make(task_class if task else base, num_labels=5, **config).eval()
    return convert(model), torch.randn(shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_is_refused_however_requested(family):
    """The forward's argument (base and task model, tuple outputs too), the config at construction
    and set after conversion: one ValueError naming the layer. The forward's False wins over the
    config's True, as transformers reads it."""
    model, video = build(family)
    with pytest.raises(ValueError, match=REFUSED):
        model(video, output_attentions=True)
    task, _ = build(family, task=True)
    with pytest.raises(ValueError, match=REFUSED):
        task(video, output_attentions=True, return_dict=False)

    model, _ = build(family, output_attentions=True)
    with pytest.raises(ValueError, match=REFUSED):
        model(video)
    assert model(video, output_attentions=False).last_hidden_state.shape[0] == 2
    task, _ = build(family, task=True, output_attentions=True)
    with pytest.raises(ValueError, match=REFUSED):
        task(video)

    model, _ = build(family, attn_implementation="eager")
    assert model(video).last_hidden_state.shape[0] == 2
    model.config.output_attentions = True
    with pytest.raises(ValueError, match=REFUSED):
        model(video)


# --------------------------------------------------------------------------- vit-pytorch ViViT


def frame_mask() -> torch.Tensor:
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    return mask


def test_vit_pytorch_factorized_encoder_honours_the_frame_mask(generator):
    """The frame mask becomes key padding of the temporal transformer (joint attention)."""
    original = vit_pytorch_vivit("factorized_encoder").eval()
    converted = convert(copy.deepcopy(original))
    video = torch.randn(2, 3, 4, 32, 32, generator=generator)
    assert_masked_parity(original, converted, video, lambda m, x: m(x, mask=frame_mask()))
    assert relative_error(converted(video, mask=frame_mask())[1], converted(video)[1]) > 1e-3


def test_vit_pytorch_factorized_self_attention_refuses_the_frame_mask():
    model = convert(vit_pytorch_vivit("factorized_self_attention").eval())
    with pytest.raises(ValueError, match=r"FactorizedTransformer .*not supported in a factorised mode .*the mode is"):
        model(torch.randn(2, 3, 4, 32, 32), mask=frame_mask())
