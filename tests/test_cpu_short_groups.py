"""The cpu backend's two paths for temporal groups: up to 32 frames a group is dot products of rows
(csrc/block_math.cpp, short_group_*), beyond that the blocked matrix products of every other
group. Both against the float64 einsum reference, at the lengths around the switch."""

from __future__ import annotations

import pytest
import torch

from vivit_kernels import factorised_attention_packed

B, H, S, Dh = 2, 4, 3, 40  # a ragged head dim: 40 is not a multiple of the 8- or 16-wide vectors
# Max error relative to the float64 reference's largest value, outputs and qkv gradients, every
# length: fp64 measured <= 1.1e-15; fp32 (its inputs rounded from the reference's) <= 6.5e-7.
BOUNDS = {torch.float64: 1e-14, torch.float32: 2e-6}


pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _inputs(frames: int, generator: torch.Generator):
    """A packed qkv and an output gradient, each a non-contiguous view with its own strides."""
    N = frames * S
    qkv = torch.randn(B, N, 3 * H * Dh + 8, dtype=torch.float64, generator=generator)[..., 5 : 5 + 3 * H * Dh]
    grad = torch.randn(H * Dh, N, B, dtype=torch.float64, generator=generator).permute(2, 1, 0)
    return qkv, grad


def _run(qkv, grad, frames, mode, backend, dtype=torch.float64):
    x = qkv.detach().to(dtype).requires_grad_()
    out = factorised_attention_packed(x, H, frames, mode, backend=backend)
    out.backward(grad.to(dtype))
    return out.detach().double(), x.grad.double()


# fp32 runs the vectorised exponentials (whole 8-float vectors and the tail of a group's L x L
# scores: 2 x 2 = 4 is all tail, 31 x 31 = 961 is 120 vectors and 1).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("frames", [1, 2, 16, 31, 32, 33, 40])
@pytest.mark.parametrize("mode", ["temporal", "split"])
def test_every_group_length_matches_the_reference(frames, mode, dtype, generator):
    qkv, grad = _inputs(frames, generator)
    out, dqkv = _run(qkv, grad, frames, mode, "cpu", dtype)
    ref_out, ref_dqkv = _run(qkv, grad, frames, mode, "reference")
    for name, actual, expected in (("out", out, ref_out), ("d(qkv)", dqkv, ref_dqkv)):
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error < BOUNDS[dtype], f"{name}: {error:.2e}"


# fp32 groups on a CPU with AVX-512 and a head dim of whole 16-float vectors run their head-dim-wide
# products on 16-float vectors, and their scores too where the length pads no further to 16 than to 8
# (9-16, 25-32 members); 8-float vectors otherwise (csrc/block_math.cpp, float_widths). Up to 8
# members, the score products split the head dim between the halves of 16-float vectors
# (paired_scores) where q's and the output gradient's rows hold whole pairs of floats, and stay on
# 8 floats where they do not (odd_rows: tokens an odd number of floats apart). Lengths on both
# sides of each switch, ViT head dims.
@pytest.mark.parametrize("head_dim", [48, 64, 80])
@pytest.mark.parametrize(
    "frames, odd_rows",
    [(frames, False) for frames in (5, 7, 8, 9, 16, 17, 24, 25, 32)] + [(frames, True) for frames in (5, 7, 8)],
)
@pytest.mark.parametrize("mode", ["temporal", "split"])
def test_both_vector_widths_match_the_reference(frames, odd_rows, head_dim, mode, generator, poisoned):
    heads, tokens_per_frame = 2, 3
    N = frames * tokens_per_frame
    qkv = torch.randn(1, N, 3 * heads * head_dim, dtype=torch.float64, generator=generator)
    grad = torch.randn(1, N, heads * head_dim, dtype=torch.float64, generator=generator)

    def rows(x: torch.Tensor) -> torch.Tensor:
        """x, or a view of it whose tokens are an odd number of elements apart."""
        if not odd_rows:
            return x
        wider = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
        wider[..., : x.shape[-1]] = x
        return wider[..., : x.shape[-1]]

    def run(backend, dtype):
        x = rows(qkv.to(dtype)).requires_grad_()
        out = factorised_attention_packed(x, heads, frames, mode, backend=backend)
        out.backward(rows(grad.to(dtype)))
        return out.detach().double(), x.grad.double()

    for name, actual, expected in zip(("out", "d(qkv)"), run("cpu", torch.float32), run("reference", torch.float64)):
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error < BOUNDS[torch.float32], f"{name}: {error:.2e}"


@pytest.mark.parametrize("frames", [8, 33])
def test_a_nan_key_stays_in_its_group(frames, generator):
    """A NaN key poisons the outputs of its own temporal group (every query sees it) and no other."""
    qkv, _ = _inputs(frames, generator)
    qkv = qkv.clone()
    token, head = S + 1, 2  # frame 1, patch 1: the group of patch 1
    qkv[0, token, H * Dh + head * Dh + 3] = float("nan")  # one element of that token's key
    out = factorised_attention_packed(qkv, H, frames, "temporal", backend="cpu").view(B, frames, S, H, Dh)
    poisoned = out.isnan().any(-1)  # (B, T, S, H)
    expected = torch.zeros_like(poisoned)
    expected[0, :, 1, head] = True
    assert torch.equal(poisoned, expected)


# A head dim past whole vectors (8 floats, 4 doubles: a tail in every product and transpose), odd
# group lengths, prefix tokens (a temporal head's own prefix group) and both token layouts.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "frames, prefix, layout", [(5, 1, "time_major"), (7, 2, "space_major"), (16, 0, "space_major")]
)
@pytest.mark.parametrize("mode", ["temporal", "split"])
def test_ragged_head_dim_prefix_and_layouts_match_the_reference(frames, prefix, layout, mode, dtype, generator):
    heads, head_dim, tokens_per_frame = 4, 21, 3
    N = prefix + frames * tokens_per_frame
    qkv = torch.randn(1, N, 3 * heads * head_dim, dtype=torch.float64, generator=generator)
    grad = torch.randn(1, N, heads * head_dim, dtype=torch.float64, generator=generator)

    def run(backend, dtype):
        x = qkv.to(dtype).requires_grad_()
        out = factorised_attention_packed(
            x, heads, frames, mode, num_prefix_tokens=prefix, layout=layout, backend=backend
        )
        out.backward(grad.to(dtype))
        return out.detach().double(), x.grad.double()

    for name, actual, expected in zip(("out", "d(qkv)"), run("cpu", dtype), run("reference", torch.float64)):
        error = ((actual - expected).abs().max() / expected.abs().max()).item()
        assert error < BOUNDS[dtype], f"{name}: {error:.2e}"
