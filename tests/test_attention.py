"""The public attention API: dispatch, the FactorisedAttention module, bad input, NaN behaviour."""

import pytest
import torch
from conftest import MODES, masked_attention, packed_qkv, relative_error

from vivit_kernels import BackendUnsupportedError, FactorisedAttention, factorised_attention
from vivit_kernels.backends import registry


@pytest.mark.parametrize("mode", MODES)
def test_public_op_matches_oracle(mode, generator):
    q, k, v, _ = packed_qkv(2, 4, 3 * 7, 24, generator=generator, requires_grad=False)
    out = factorised_attention(q, k, v, 3, mode, backend="reference")
    assert out.shape == q.shape
    assert relative_error(out, masked_attention(q, k, v, 3, mode)) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_split_is_spatial_heads_then_temporal_heads(backend, generator):
    q, k, v, _ = packed_qkv(2, 6, 5 * 7, 16, dtype=torch.float32, generator=generator, requires_grad=False)
    split = factorised_attention(q, k, v, 5, "split", backend=backend)
    spatial = factorised_attention(q[:, :3], k[:, :3], v[:, :3], 5, "spatial", backend=backend)
    temporal = factorised_attention(q[:, 3:], k[:, 3:], v[:, 3:], 5, "temporal", backend=backend)
    torch.testing.assert_close(split, torch.cat([spatial, temporal], dim=1), rtol=1e-6, atol=1e-6)


def test_module_loads_timm_attention_and_matches_it(generator):
    from timm.layers import Attention

    torch.manual_seed(0)
    timm_attn = Attention(48, num_heads=4, qkv_bias=True).eval()
    ours = FactorisedAttention(48, num_heads=4, mode="joint", qkv_bias=True).eval()
    ours.load_state_dict(timm_attn.state_dict())  # strict: the parameter names are the interface
    x = torch.randn(2, 3 * 5, 48, generator=generator)
    torch.testing.assert_close(ours(x, frames=3), timm_attn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_module_grid_and_flat_inputs_agree(mode, generator):
    attn = FactorisedAttention(32, num_heads=4, mode=mode)
    x = torch.randn(2, 3, 5, 32, generator=generator)
    grid = attn(x)
    assert grid.shape == x.shape
    torch.testing.assert_close(attn(x.reshape(2, 15, 32), frames=3), grid.reshape(2, 15, 32))


def test_module_attention_dropout_only_in_training(generator):
    attn = FactorisedAttention(32, num_heads=4, mode="split", attn_drop=0.5, backend="reference")
    x = torch.randn(1, 3, 4, 32, generator=generator)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


@pytest.mark.parametrize(
    "mode, poisoned_rows",
    [
        ("joint", lambda t, s: torch.ones_like(t, dtype=torch.bool)),
        ("spatial", lambda t, s: t == 1),
        ("temporal", lambda t, s: s == 2),
    ],
)
def test_nan_stays_in_the_groups_that_see_it(mode, poisoned_rows, generator):
    T, S = 3, 4
    q, k, v, _ = packed_qkv(1, 2, T * S, 8, generator=generator, requires_grad=False)
    k = k.clone()
    k[:, :, 1 * S + 2] = float("nan")  # the key of token (t=1, s=2)
    out = factorised_attention(q, k, v, T, mode)
    n = torch.arange(T * S)
    rows = poisoned_rows(n // S, n % S)
    assert out[:, :, rows].isnan().all()
    assert out[:, :, ~rows].isfinite().all()


def _qkv(shape=(1, 4, 12, 8), dtype=torch.float32):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: (*_qkv(), 5, "joint"), ValueError, r"N=12 tokens is not divisible by frames=5"),
        (lambda: (*_qkv(), 0, "joint"), ValueError, r"frames must be >= 1, got 0"),
        (lambda: (*_qkv(), 2.0, "joint"), TypeError, r"frames must be an int, got float"),
        (lambda: (*_qkv((1, 3, 12, 8)), 3, "split"), ValueError, r"even number of heads .* got H=3"),
        (lambda: (*_qkv(), 3, "diagonal"), ValueError, r"unknown mode 'diagonal'; expected one of"),
        (lambda: (*_qkv()[:2], torch.randn(1, 4, 12, 16), 3, "joint"), ValueError, r"one shape .* v \(1, 4, 12, 16\)"),
        (lambda: (*_qkv((4, 12, 8)), 3, "joint"), ValueError, r"q must be 4-D \(B, H, N, Dh\), got shape \(4, 12, 8\)"),
        (lambda: (*_qkv(dtype=torch.int64), 3, "joint"), TypeError, r"q must have a floating dtype, got torch.int64"),
        (lambda: (*_qkv()[:2], torch.randn(1, 4, 12, 8).double(), 3, "joint"), TypeError, r"v has dtype torch.float64"),
        (lambda: (None, *_qkv()[:2], 3, "joint"), TypeError, r"q must be a torch.Tensor, got NoneType"),
    ],
)
def test_bad_attention_input_raises_clear_error(make_args, error, message):
    with pytest.raises(error, match=message):
        factorised_attention(*make_args())


def test_bad_scale_and_backend_raise():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"scale must be a finite float or None, got nan"):
        factorised_attention(q, k, v, 3, "joint", scale=float("nan"))
    with pytest.raises(ValueError, match=r"unknown backend 'cuda_magic'; expected 'auto' or one of 'reference'"):
        factorised_attention(q, k, v, 3, "joint", backend="cuda_magic")


def test_bad_module_arguments_raise():
    with pytest.raises(ValueError, match=r"dim=50 is not divisible by num_heads=4"):
        FactorisedAttention(50, num_heads=4)
    with pytest.raises(ValueError, match=r"even number of heads .* num_heads=3"):
        FactorisedAttention(48, num_heads=3, mode="split")
    attn = FactorisedAttention(48, num_heads=4)
    with pytest.raises(ValueError, match=r"needs frames=T"):
        attn(torch.randn(1, 12, 48))
    with pytest.raises(ValueError, match=r"x has dim 32, expected 48"):
        attn(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match=r"N=12 tokens is not divisible by frames=5"):
        attn(torch.randn(1, 12, 48), frames=5)


@pytest.fixture
def picky_backend(monkeypatch):
    """The only fused backend, refusing float32, for one test."""
    monkeypatch.setattr(registry, "_BACKENDS", {"reference": registry.get("reference")})
    fused = registry.OpSupport(lambda q, k, v, frames, mode, scale: q * 0 + 7, ("cpu",), (torch.float64,))
    registry.register(registry.Backend("picky", ops={"attention": fused}))
    return fused


def test_auto_prefers_a_fused_backend_that_fits(picky_backend):
    q, k, v = _qkv(dtype=torch.float64)
    assert (factorised_attention(q, k, v, 3, "joint") == 7).all()


def test_auto_falls_back_with_every_reason_and_named_backend_refuses(picky_backend):
    q, k, v = _qkv()
    with pytest.warns(UserWarning, match=r"using the reference implementation \(picky: dtype float32 not supported"):
        out = factorised_attention(q, k, v, 3, "joint")
    torch.testing.assert_close(out, masked_attention(q, k, v, 3, "joint").float())
    with pytest.raises(BackendUnsupportedError, match=r"backend 'picky' cannot run this input: dtype float32"):
        factorised_attention(q, k, v, 3, "joint", backend="picky")


def test_module_stands_in_a_timm_block(generator):
    from timm.models.vision_transformer import Block

    block = Block(32, num_heads=4, qkv_bias=True).eval()
    reference_out = block(x := torch.randn(2, 3 * 5, 32, generator=generator))
    attn = FactorisedAttention(32, num_heads=4, mode="joint", frames=3)
    attn.load_state_dict(block.attn.state_dict())
    block.attn = attn
    torch.testing.assert_close(block(x), reference_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"attn_mask / is_causal are not supported"):
        block(x, is_causal=True)
