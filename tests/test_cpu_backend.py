"""The "cpu" backend (the C++ kernels of csrc/) against float64 oracles, through the public API."""

import dataclasses

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
)

from vivit_kernels import (
    BackendUnsupportedError,
    attention_backend,
    factorised_attention,
    factorised_attention_packed,
    saved_bytes,
    tubelet_backend,
    tubelet_embedding,
)
from vivit_kernels import reference as naive
from vivit_kernels.backends import registry

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def _oracle_grads(qkv, frames, mode, grad_out, scale=None):
    pack = qkv.detach().double().requires_grad_()
    q, k, v = pack.permute(2, 0, 3, 1, 4).unbind(0)
    out = masked_attention(q, k, v, frames, mode, scale)
    (grad,) = torch.autograd.grad(out, pack, grad_out.double())
    return out, grad


# Awkward grids from the reference tests: group lengths 1, 3, 5, 7, 35, 196 and 980 (blocks hold up
# to 256 rows, so joint at 980 tokens runs 4 x 4 query/key blocks; groups under ~16 take the small
# loops, longer ones BLAS), with heads, head dims and batch cycling.
GRIDS = [(1, 7), (3, 1), (5, 7), (3, 35), (1, 196), (5, 196)]
HEADS, HEAD_DIMS, BATCHES = (2, 4), (24, 40, 64), (1, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", range(len(GRIDS)))
def test_attention_matches_oracle(case, mode, dtype, generator, poisoned):
    T, S = GRIDS[case]
    H, Dh, B = HEADS[case % 2], HEAD_DIMS[case % 3], BATCHES[(case // 2) % 2]
    q, k, v, qkv = packed_qkv(B, H, T * S, Dh, dtype=dtype, generator=generator)
    grad_out = torch.randn(B, H, T * S, Dh, dtype=dtype, generator=generator)

    out = factorised_attention(q, k, v, T, mode, backend="cpu")
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    expected, expected_grad = _oracle_grads(qkv, T, mode, grad_out)

    assert out.dtype == dtype and out.shape == q.shape
    assert out.transpose(1, 2).is_contiguous()  # a (B, N, H, Dh) buffer: the projection reads it for free
    assert_near_oracle(out, expected, "cpu")
    assert_near_oracle(grad, expected_grad, "cpu", "dqkv")


@pytest.mark.filterwarnings("ignore:TF32 acceleration:UserWarning")  # torch's flags() on CPU-only builds
@pytest.mark.parametrize("mode", ["spatial", "joint"])
def test_float_products_without_onednn(mode, generator, poisoned):
    """With oneDNN turned off, the float block products that take its brgemm micro-kernel go
    through ATen's BLAS fallback instead (the transposed operands as the kernel leaves them)."""
    T, S, H, Dh = 2, 196, 2, 40
    q, k, v, qkv = packed_qkv(1, H, T * S, Dh, dtype=torch.float32, generator=generator)
    grad_out = torch.randn(q.shape, generator=generator)
    with torch.backends.mkldnn.flags(enabled=False):
        out = factorised_attention(q, k, v, T, mode, backend="cpu")
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
    expected, expected_grad = _oracle_grads(qkv, T, mode, grad_out)
    assert_near_oracle(out, expected, "cpu")
    assert_near_oracle(grad, expected_grad, "cpu", "dqkv")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@every_layout_case
def test_inputs_and_output_gradient_in_layouts_of_their_own(grid, mode, packed, dtype, generator, poisoned):
    """One padded, one offset, one transposed and one with a strided head dim (copied once)."""
    check_distinct_layouts("cpu", grid, mode, packed, generator, dtype)


# Groups past the short-group loops (the block products, each input read through its own row
# stride); spatial ones with a class token past one gathered block.
LONG_GRIDS = [(0, 2, 40, "time_major", 0.3), (1, 2, 260, "space_major", None)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("grid", LONG_GRIDS, ids=["S40", "P1-S260"])
def test_long_groups_in_layouts_of_their_own(grid, mode, generator, poisoned):
    check_distinct_layouts("cpu", grid, mode, False, generator, torch.float32, grids=LONG_GRIDS)


@pytest.mark.parametrize("mode", MODES)
def test_attention_gradcheck(mode, generator):
    q, k, v, _ = packed_qkv(1, 2, 3 * 4, 5, generator=generator)
    assert torch.autograd.gradcheck(
        lambda q, k, v: factorised_attention(q, k, v, 3, mode, 0.7, backend="cpu"), (q, k, v)
    )


@pytest.mark.parametrize(
    "mode, poisoned_rows",
    [("joint", lambda t, s: t >= 0), ("spatial", lambda t, s: t == 1), ("temporal", lambda t, s: s == 2)],
)
def test_attention_nan_stays_in_its_groups(mode, poisoned_rows, generator):
    T, S = 3, 128  # spatial groups of 128 take BLAS (128 x 128 x 8 products), temporal groups of 3 the small loops
    q, k, v, _ = packed_qkv(1, 2, T * S, 8, dtype=torch.float32, generator=generator, requires_grad=False)
    k = k.clone()
    k[:, :, 1 * S + 2] = float("nan")
    out = factorised_attention(q, k, v, T, mode, backend="cpu")
    n = torch.arange(T * S)
    rows = poisoned_rows(n // S, n % S)
    assert out[:, :, rows].isnan().all()
    assert out[:, :, ~rows].isfinite().all()


def _sdpa_with_permutes(q, k, v, frames, mode):
    """torch's SDPA on each mode's groups, with the reshapes/permutes it needs."""
    B, H, N, Dh = q.shape
    if mode == "joint":
        return F.scaled_dot_product_attention(q, k, v)
    if mode == "split":
        half = H // 2
        spatial = _sdpa_with_permutes(q[:, :half], k[:, :half], v[:, :half], frames, "spatial")
        temporal = _sdpa_with_permutes(q[:, half:], k[:, half:], v[:, half:], frames, "temporal")
        return torch.cat([spatial, temporal], dim=1)
    group = (
        (lambda x: x.reshape(B, H, frames, -1, Dh))
        if mode == "spatial"
        else (lambda x: x.reshape(B, H, frames, -1, Dh).transpose(2, 3))
    )
    out = F.scaled_dot_product_attention(group(q), group(k), group(v))
    return (out if mode == "spatial" else out.transpose(2, 3)).reshape(B, H, N, Dh)


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward hands back no gradient (None)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return None


@pytest.mark.parametrize("packed", [False, True])
def test_backward_without_an_output_gradient(packed, generator):
    """The ops' C++ autograd reached with no gradient for the output (a later function returned
    None for it) hands back none either, rather than running the backward kernel on nothing."""
    q, k, v, qkv = packed_qkv(1, 2, 12, 8, dtype=torch.float64, generator=generator)
    if packed:
        out = factorised_attention_packed(qkv.flatten(2), 2, 3, "split", backend="cpu")
    else:
        out = factorised_attention(q, k, v, 3, "split", backend="cpu")
    # The other term keeps qkv in the graph, so the engine does call the op's backward.
    loss = _NoGradient.apply(out).sum() + qkv.sum()
    (grad,) = torch.autograd.grad(loss, qkv)
    assert torch.equal(grad, torch.ones_like(qkv))


@pytest.mark.parametrize("mode", MODES)
def test_saved_for_backward(mode, generator):
    """The op keeps q, k, v (views of the pack: no copy), out and the log-sum-exp: O(N) per head.

    Per layer that is no more than SDPA with its permutes keeps: the output projection saves its
    input, which for the fused op is `out` itself (a free view), and a copy of SDPA's output. (The
    op alone can keep more than SDPA for short groups: 8 frames of probabilities are smaller than
    64 dims of output.)
    """
    B, H, T, S, Dh = 1, 4, 8, 24, 16
    N, D = T * S, H * Dh
    q, k, v, qkv = packed_qkv(B, H, N, Dh, dtype=torch.float32, generator=generator)
    saved = saved_bytes(lambda: factorised_attention(q, k, v, T, mode, backend="cpu"))
    assert saved == 4 * B * N * (3 * D + D + H)  # the pack, out, lse

    x = torch.randn(B, N, D, generator=generator, requires_grad=True)
    qkv_proj, out_proj = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)

    def layer(attention):
        q, k, v = qkv_proj(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
        return out_proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))

    fused = saved_bytes(lambda: layer(lambda q, k, v: factorised_attention(q, k, v, T, mode, backend="cpu")))
    assert fused <= saved_bytes(lambda: layer(lambda q, k, v: _sdpa_with_permutes(q, k, v, T, mode)))
    if mode == "joint":  # the naive path keeps the N x N probabilities
        assert saved < saved_bytes(lambda: factorised_attention(q, k, v, T, mode, backend="reference"))


def test_auto_picks_cpu_for_cpu_tensors(generator):
    q, k, v, _ = packed_qkv(1, 2, 6, 64, dtype=torch.float32, generator=generator, requires_grad=False)
    assert attention_backend(q, k, v, 2, "split") == "cpu"
    assert (
        tubelet_backend(torch.zeros(1, 3, 2, 8, 8, dtype=torch.float64), torch.zeros(4, 3, 2, 4, 4).double()) == "cpu"
    )


def test_unavailable_backend_falls_back_or_refuses(monkeypatch, generator):
    reason = "the C++ kernels are not available: no C++ compiler"
    broken = dataclasses.replace(registry.get("cpu"), unavailable=lambda: reason)
    monkeypatch.setitem(registry._BACKENDS, "cpu", broken)
    q, k, v, _ = packed_qkv(1, 2, 6, 8, dtype=torch.float32, generator=generator, requires_grad=False)
    with pytest.warns(UserWarning, match="cpu: the C.. kernels are not available: no C.. compiler"):
        out = factorised_attention(q, k, v, 2, "spatial")
    torch.testing.assert_close(out, naive.factorised_attention(q, k, v, 2, "spatial"))
    with pytest.raises(BackendUnsupportedError, match="backend 'cpu' cannot run.*no C.. compiler"):
        factorised_attention(q, k, v, 2, "spatial", backend="cpu")


def test_missing_compiler_is_named(monkeypatch):
    from vivit_kernels import _extension

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in _extension._cannot_build() and "install g++" in _extension._cannot_build()


def test_unsupported_dtype_is_refused():
    q = torch.zeros(1, 2, 4, 8, dtype=torch.float16)
    with pytest.raises(BackendUnsupportedError, match="dtype float16 not supported"):
        factorised_attention(q, q, q, 2, "joint", backend="cpu")


# Tubelet embedding: shapes that leave frames, rows and columns over (dropped, zero gradient).
# The last has 2 x 2744 tubes of 3 x 16 x 16: the kernel's blocks of at most 2^22 gathered elements
# (5461 tubes) end in the second clip, in the middle of a row of tubes.
CLIPS = [((4, 8, 8), (2, 4, 4)), ((7, 11, 16), (3, 5, 7)), ((3, 17, 9), (1, 8, 8)), ((2, 4, 4), (2, 4, 4))]
CLIPS += [((5, 40, 37), (2, 4, 4)), ((14, 230, 230), (1, 16, 16))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip, tubelet", CLIPS)
def test_tubelet_matches_conv3d(clip, tubelet, dtype, generator, poisoned):
    B, C, D = 2, 3, 70
    # A (B, T, C, H, W) decoder output seen as (B, C, T, H, W): strided, read without a copy.
    video = torch.randn(B, clip[0], C, *clip[1:], dtype=torch.float64, generator=generator).transpose(1, 2)
    weight = torch.randn(D, C, *tubelet, dtype=torch.float64, generator=generator)
    bias = torch.randn(D, dtype=torch.float64, generator=generator)
    nt, nh, nw = (c // t for c, t in zip(clip, tubelet))
    pos_embed = torch.randn(nt, nh * nw, D, dtype=torch.float64, generator=generator)
    inputs = [x.to(dtype).requires_grad_() for x in (video, weight, bias, pos_embed)]
    grad_out = torch.randn(B, nt, nh * nw, D, dtype=dtype, generator=generator)

    tokens = tubelet_embedding(*inputs, backend="cpu")
    grads = torch.autograd.grad(tokens, inputs, grad_out)

    exact = [x.detach().double().requires_grad_() for x in inputs]
    conv = F.conv3d(exact[0], exact[1], exact[2], stride=tubelet)
    expected = conv.flatten(3).permute(0, 2, 3, 1) + exact[3]
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    assert tokens.shape == (B, nt, nh * nw, D) and tokens.dtype == dtype
    assert_near_oracle(tokens, expected, "cpu", "tokens", op="tubelet")
    for name, grad, expected_grad in zip(("dvideo", "dweight", "dbias", "dpos"), grads, expected_grads):
        assert_near_oracle(grad, expected_grad, "cpu", name, op="tubelet")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shift", range(len(LAYOUTS)))
def test_tubelet_inputs_and_output_gradient_in_layouts_of_their_own(shift, dtype, generator, poisoned):
    """video, weight, pos_embed and the output gradient each in a layout of its own; every one of
    them in each layout across the shifts."""
    check_tubelet_distinct_layouts("cpu", shift, generator, dtype)


def test_tubelet_without_bias_or_pos_embed_and_gradcheck(generator):
    video = torch.randn(1, 2, 3, 5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(3, 2, 2, 2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    tokens = tubelet_embedding(video, weight, backend="cpu")
    assert_near_oracle(tokens, naive.tubelet_embedding(video, weight), "cpu", "tokens", op="tubelet")
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True)
    pos_embed = torch.randn(1, 4, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: tubelet_embedding(*x, backend="cpu"), (video, weight, bias, pos_embed))


def _has_onednn_linear() -> bool:
    """Whether torch registers the oneDNN matmul op the tubelet kernel calls."""
    try:
        registered = torch._C._dispatch_has_kernel_for_dispatch_key("mkldnn::_linear_pointwise", "CPU")
    except RuntimeError:  # no such operator: torch built without oneDNN
        return False
    return registered and torch.backends.mkldnn.is_available()


@pytest.mark.filterwarnings("ignore:TF32 acceleration:UserWarning")  # torch's flags() on CPU-only builds
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn-on", "onednn-off"])
def test_tubelet_float_products_on_onednn_else_blas(onednn, generator, poisoned):
    """Float tubelet products go to oneDNN's matmul where torch has it and it is on, to BLAS
    otherwise: the route each takes (the profiler sees the op the kernel calls), and both against
    the float64 oracle, every gradient."""
    video = torch.randn(2, 3, 5, 20, 26, generator=generator).requires_grad_()
    weight = torch.randn(40, 3, 2, 4, 4, generator=generator).requires_grad_()
    bias = torch.randn(40, generator=generator).requires_grad_()
    pos_embed = torch.randn(2, 5 * 6, 40, generator=generator).requires_grad_()
    inputs = (video, weight, bias, pos_embed)
    grad_out = torch.randn(2, 2, 30, 40, generator=generator)
    with torch.backends.mkldnn.flags(enabled=onednn), torch.profiler.profile() as profile:
        tokens = tubelet_embedding(*inputs, backend="cpu")
        grads = torch.autograd.grad(tokens, inputs, grad_out)
    ran = {event.name for event in profile.events()}
    if onednn and _has_onednn_linear():
        assert "mkldnn::_linear_pointwise" in ran and not ran & {"aten::mm", "aten::addmm"}
    else:
        assert "mkldnn::_linear_pointwise" not in ran and ran & {"aten::mm", "aten::addmm"}
    exact = [x.detach().double().requires_grad_() for x in inputs]
    expected = naive.tubelet_embedding(*exact)
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    assert_near_oracle(tokens, expected, "cpu", "tokens", op="tubelet")
    for name, grad, expected_grad in zip(("dvideo", "dweight", "dbias", "dpos"), grads, expected_grads):
        assert_near_oracle(grad, expected_grad, "cpu", name, op="tubelet")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix, frames, tokens_per_frame, layout", PREFIX_CASES)
def test_prefix_tokens_and_layouts_match_oracle(prefix, frames, tokens_per_frame, layout, mode, generator, poisoned):
    """Class / register tokens before the grid, time- or space-major grids: every mode's rule
    (spatial prefix queries averaged over frames, temporal prefix among itself), forward and all
    gradients, against the masked dense oracle."""
    B, H, Dh = 2, 4, 24
    q, k, v, _ = packed_qkv(B, H, prefix + frames * tokens_per_frame, Dh, dtype=torch.float64, generator=generator)
    grad_out = torch.randn(q.shape, dtype=torch.float64, generator=generator)
    out = factorised_attention(q, k, v, frames, mode, num_prefix_tokens=prefix, layout=layout, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_near_oracle(actual, want, "cpu", name)


@pytest.mark.parametrize("mode", ["spatial", "split"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "prefix, frames, tokens_per_frame, layout, Dh",
    [
        (1, 2, 255, "space_major", 40),
        (2, 2, 255, "time_major", 48),
        (1, 3, 196, "space_major", 80),
        (3, 2, 300, "time_major", 40),
    ],
)
def test_spatial_groups_with_prefix_gathered_or_in_blocks(
    prefix, frames, tokens_per_frame, layout, Dh, dtype, mode, generator, poisoned
):
    """Spatial groups with prefix tokens: up to 256 rows in all (1 + 255, 1 + 196) gathered into
    one block, prefix rows first; longer (2 + 255, 3 + 300), a block of prefix rows and blocks of
    members merged by the online softmax. Forward and all gradients against the dense oracle."""
    B, H = 1, 2
    q, k, v, _ = packed_qkv(B, H, prefix + frames * tokens_per_frame, Dh, dtype=dtype, generator=generator)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=generator)
    out = factorised_attention(q, k, v, frames, mode, num_prefix_tokens=prefix, layout=layout, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_near_oracle(actual, want, "cpu", name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("frames, tokens_per_frame, layout", [(3, 37, "space_major"), (2, 515, "time_major")])
def test_spatial_groups_in_one_key_block_or_several(frames, tokens_per_frame, layout, dtype, generator, poisoned):
    """Spatial groups without prefix tokens: up to 512 tokens, one key block whose product with V is
    written straight into the output rows (`frames` tokens apart when space-major); longer, key
    blocks merged by the online softmax."""
    B, H, Dh = 1, 2, 40
    q, k, v, _ = packed_qkv(B, H, frames * tokens_per_frame, Dh, dtype=dtype, generator=generator)
    grad_out = torch.randn(q.shape, dtype=dtype, generator=generator)
    out = factorised_attention(q, k, v, frames, "spatial", layout=layout, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = oracle_and_grads(q, k, v, grad_out, frames, "spatial", 0, layout)
    for name, actual, want in zip(("out", "dq", "dk", "dv"), (out, *grads), expected):
        assert_near_oracle(actual, want, "cpu", name)
