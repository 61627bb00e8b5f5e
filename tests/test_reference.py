"""The reference ops against independent oracles: masked dense attention, and F.conv3d."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAYOUTS,
    MODES,
    PREFIX_CASES,
    assert_near_oracle,
    check_distinct_layouts,
    check_tubelet_distinct_layouts,
    every_layout_case,
    masked_attention,
    oracle_and_grads,
    packed_qkv,
    relative_error,
)

from vivit_kernels import factorised_attention, factorised_attention_packed, reference
from vivit_kernels.checks import AttentionShape

# Every (T, S) pair at every mode; heads, head dims and batch cycle through the cases so each
# value is covered without the full cross product.
GRIDS = list(itertools.product((1, 3, 5), (1, 7, 35, 196)))
HEADS, HEAD_DIMS, BATCHES = (2, 6), (24, 40, 64), (1, 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(GRIDS)))
def test_attention_matches_masked_oracle(mode, case, generator):
    T, S = GRIDS[case]
    H, Dh, B = HEADS[case % 2], HEAD_DIMS[case % 3], BATCHES[(case // 2) % 2]
    q, k, v, qkv = packed_qkv(B, H, T * S, Dh, generator=generator)
    grad_out = torch.randn(B, H, T * S, Dh, dtype=torch.float64, generator=generator)

    out = reference.factorised_attention(q, k, v, T, mode)
    (grads,) = torch.autograd.grad(out, qkv, grad_out)
    expected = masked_attention(q, k, v, T, mode)
    (expected_grads,) = torch.autograd.grad(expected, qkv, grad_out)

    assert_near_oracle(out, expected, "reference")
    assert_near_oracle(grads, expected_grads, "reference", "dqkv")


@pytest.mark.parametrize("mode", MODES)
def test_attention_gradcheck(mode, generator):
    q, k, v, _ = packed_qkv(1, 2, 3 * 4, 5, generator=generator)
    assert torch.autograd.gradcheck(lambda q, k, v: reference.factorised_attention(q, k, v, 3, mode, 0.7), (q, k, v))


def test_attention_scale_is_used(generator):
    q, k, v, _ = packed_qkv(1, 2, 6, 8, generator=generator, requires_grad=False)
    out = reference.factorised_attention(q, k, v, 2, "joint", scale=0.3)
    assert_near_oracle(out, masked_attention(q, k, v, 2, "joint", scale=0.3), "reference")
    assert relative_error(out, reference.factorised_attention(q, k, v, 2, "joint")) > 1e-3  # the default scale differs


@pytest.mark.parametrize(
    "clip, tubelet",
    [((4, 8, 8), (2, 4, 4)), ((7, 11, 16), (3, 5, 7)), ((3, 17, 9), (1, 8, 8)), ((2, 4, 4), (2, 4, 4))],
)
@pytest.mark.parametrize("channels", (1, 3))
def test_tubelet_matches_conv3d(clip, tubelet, channels, generator):
    B, D = 2, 6
    video = torch.randn(B, channels, *clip, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(D, channels, *tubelet, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(D, dtype=torch.float64, generator=generator, requires_grad=True)
    nt, nh, nw = (c // t for c, t in zip(clip, tubelet))
    pos_embed = torch.randn(1, nt * nh * nw, D, dtype=torch.float64, generator=generator, requires_grad=True)

    tokens = reference.tubelet_embedding(video, weight, bias, pos_embed)
    conv = F.conv3d(video, weight, bias, stride=tubelet)  # (B, D, nt, nh, nw)
    expected = conv.flatten(3).permute(0, 2, 3, 1) + pos_embed.reshape(nt, nh * nw, D)
    assert tokens.shape == (B, nt, nh * nw, D)
    assert_near_oracle(tokens, expected, "reference", "tokens", op="tubelet")

    grad_out = torch.randn_like(tokens)
    grads = torch.autograd.grad(tokens, (video, weight, bias, pos_embed), grad_out)
    expected_grads = torch.autograd.grad(expected, (video, weight, bias, pos_embed), grad_out)
    for name, grad, expected_grad in zip(("dvideo", "dweight", "dbias", "dpos"), grads, expected_grads):
        assert_near_oracle(grad, expected_grad, "reference", name, op="tubelet")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix, frames, tokens_per_frame, layout", PREFIX_CASES)
def test_prefix_tokens_and_layouts_match_oracle(prefix, frames, tokens_per_frame, layout, mode, generator):
    """Class / register tokens before the grid, time- or space-major grids: every mode's rule
    (spatial prefix queries averaged over frames, temporal prefix among itself), forward and all
    gradients, against the masked dense oracle."""
    B, H, Dh = 2, 4, 8
    q, k, v, _ = packed_qkv(B, H, prefix + frames * tokens_per_frame, Dh, dtype=torch.float64, generator=generator)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=generator)
    out = reference.factorised_attention(q, k, v, frames, mode, num_prefix_tokens=prefix, layout=layout)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_near_oracle(actual, want, "reference", name)


@every_layout_case
def test_inputs_and_output_gradient_in_layouts_of_their_own(grid, mode, packed, generator):
    check_distinct_layouts("reference", grid, mode, packed, generator)


@pytest.mark.parametrize("shift", range(len(LAYOUTS)))
def test_tubelet_inputs_and_output_gradient_in_layouts_of_their_own(shift, generator):
    check_tubelet_distinct_layouts("reference", shift, generator)


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_grouped_attention_hands_attend_views_or_contiguous_copies(mode, contiguous, generator):
    """Without `contiguous`, attend gets views of the packed qkv (SDPA takes any strides: no copy);
    with it, contiguous copies (einsum takes them as they are)."""
    _, _, _, qkv = packed_qkv(1, 4, 3 * 5, 8, generator=generator)
    shape = AttentionShape.of((1, 4, 3 * 5, 8), 3, mode)
    seen = []

    def spy(q, k, v):
        for x in (q, k, v):
            seen.append(
                x.is_contiguous()
                if contiguous
                else x.data_ptr() in range(qkv.data_ptr(), qkv.data_ptr() + 8 * qkv.numel())
            )
        return reference.attend(q, k, v, shape.scale)

    out = reference.grouped_attention_packed(qkv.flatten(2), shape, spy, contiguous=contiguous)
    assert seen and all(seen)
    assert_near_oracle(
        out.unflatten(-1, (4, 8)).transpose(1, 2),
        masked_attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0), 3, mode),
        "reference",
    )


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("mode", MODES)
def test_output_is_a_view_of_the_projection_layout(backend, mode, generator):
    """(B, H, N, Dh) out as a view of a (B, N, H, Dh) tensor: what the output projection reads, so
    the packed op returns it with no further copy."""
    q, k, v, _ = packed_qkv(2, 4, 1 + 3 * 5, 8, generator=generator, requires_grad=False)
    out = factorised_attention(q, k, v, 3, mode, num_prefix_tokens=1, backend=backend)
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("prefix", [0, 1])
def test_packed_backward_writes_the_qkv_gradient_once(backend, prefix, generator):
    """The q, k and v gradients are written straight into one (B, N, 3 * H * Dh) tensor: no stack
    or concatenation of them afterwards."""
    _, _, _, qkv = packed_qkv(1, 4, prefix + 3 * 5, 8, generator=generator)
    out = factorised_attention_packed(qkv.flatten(2), 4, 3, "temporal", num_prefix_tokens=prefix, backend=backend)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=generator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out.backward(grad)
    assert not {event.name for event in profile.events()} & {"aten::stack", "aten::cat"}
