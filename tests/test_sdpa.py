"""The "sdpa" backend (vivit_kernels/backends/sdpa.py): torch SDPA with each mode's grouping, what
"auto" runs where no fused kernel fits; and half precision, which the fused CPU kernels do not take."""

import warnings

import pytest
import torch
from conftest import (
    MODES,
    PREFIX_CASES,
    assert_near_oracle,
    check_distinct_layouts,
    every_layout_case,
    oracle_and_grads,
    packed_qkv,
    relative_error,
)

from vivit_kernels import FactorisedAttention, attention_backend, factorised_attention, saved_bytes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix, frames, tokens_per_frame, layout", [(0, 3, 7, "time_major"), *PREFIX_CASES[:4]])
def test_matches_oracle_with_prefix_tokens_and_layouts(prefix, frames, tokens_per_frame, layout, mode, generator):
    q, k, v, _ = packed_qkv(2, 4, prefix + frames * tokens_per_frame, 16, generator=generator)
    grad_out = torch.randn(q.shape, dtype=q.dtype, generator=generator)
    out = factorised_attention(q, k, v, frames, mode, num_prefix_tokens=prefix, layout=layout, backend="sdpa")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_near_oracle(actual, want, "sdpa", name)


@every_layout_case
def test_inputs_and_output_gradient_in_layouts_of_their_own(grid, mode, packed, generator):
    check_distinct_layouts("sdpa", grid, mode, packed, generator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_runs_sdpa_for_half_precision_on_cpu_and_says_why(dtype, generator):
    q, k, v, _ = packed_qkv(1, 4, 3 * 20, 32, dtype=dtype, generator=generator)
    with pytest.warns(UserWarning, match=r"using torch SDPA \(.*cpu: dtype (float16|bfloat16) not supported"):
        assert attention_backend(q, k, v, 3, "split") == "sdpa"


@pytest.mark.parametrize("mode", MODES)
def test_half_precision_keeps_no_score_matrix(mode, generator):
    """Bytes saved for backward in bf16 at ViViT-like size (8 x 196 tokens): what SDPA keeps
    (inputs, output, log-sum-exp), a fraction of what the einsum reference keeps (its probabilities)."""
    q, k, v, _ = packed_qkv(1, 4, 8 * 196, 64, dtype=torch.bfloat16, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = saved_bytes(factorised_attention, q, k, v, 8, mode)
    sdpa = saved_bytes(factorised_attention, q, k, v, 8, mode, backend="sdpa")
    reference = saved_bytes(factorised_attention, q, k, v, 8, mode, backend="reference")
    assert auto == sdpa
    assert sdpa < reference / 1.5


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_large_half_precision_logits_stay_finite(backend, generator):
    """fp16 inputs of magnitude ~1e2 give logits of ~1e4 x Dh: scores and softmax must be computed
    in float32 (in fp16 they overflow to inf and the softmax to NaN)."""
    q, k, v, _ = packed_qkv(1, 2, 3 * 10, 16, dtype=torch.float64, generator=generator, requires_grad=False)
    q, k = q * 100, k * 100
    half = [x.half() for x in (q, k, v)]
    out = factorised_attention(*half, 3, "joint", backend=backend)
    truth = factorised_attention(*(x.double() for x in half), 3, "joint", backend="reference")
    assert out.isfinite().all()
    # Logits of ~1e4 make each softmax one-hot, so out is a row of v: measured 1.6e-15 (seeds 0-4).
    assert relative_error(out, truth) < 5e-15


def test_module_under_cpu_autocast_trains(generator):
    """`torch.autocast("cpu", torch.bfloat16)`: the projections run in bf16, attention in SDPA."""
    attn = FactorisedAttention(64, 4, mode="split", tokens_per_frame=6, num_prefix_tokens=1)
    x = torch.randn(2, 1 + 3 * 6, 64, generator=generator, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = attn(x)
    out.float().sum().backward()
    expected = attn(x.detach())
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 1.5e-2  # measured 4.5e-3 (seeds 0-4)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in attn.parameters())
