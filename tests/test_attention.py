"""The public attention API: the op, the FactorisedAttention module, NaN behaviour."""

import pytest
import torch
from conftest import MODES, masked_attention, packed_qkv, relative_error

from vivit_kernels import FactorisedAttention, attention_backend, factorised_attention


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


def test_backend_names_the_choice_without_computing(generator):
    q, k, v, _ = packed_qkv(1, 2, 3 * 4, 8, dtype=torch.float32, generator=generator, requires_grad=False)
    assert attention_backend(q, k, v, 3, "split") == "cpu"
    assert attention_backend(q, k, v, 3, "split", backend="reference") == "reference"
    with pytest.warns(UserWarning, match="no fused backend fits"):
        assert attention_backend(q.double(), k.double(), v.double(), 3, "split", dropout_p=0.1) == "reference"
    with pytest.raises(ValueError, match="N=12 tokens is not divisible by frames=5"):
        attention_backend(q, k, v, 5, "split")


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
