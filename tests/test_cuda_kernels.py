"""The compiled Triton kernels on a CUDA device: what the interpreter cannot show.

Skipped without a CUDA device (every test says so). On a GPU (`make gpu-check` runs this module
with the other CUDA tests) the kernels run compiled: real bf16 and fp16 tensor-core dots (the
interpreter upcasts bf16 dots, triton-lang/triton#11584), fp32 as tf32x3, the autotuner's
choices at ViViT-B sizes, the d(weight) split by its rule, bitwise determinism, tensors on a
device other than the current one, and CUDA autocast. Every result is checked against a float64
reference: fp32 at 1e-5, fp16/bf16 at most twice as far from it as the plain reference
implementation run in the same precision (FlashAttention's yardstick).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODES, masked_attention, relative_error

from vivit_kernels import attention_backend, factorised_attention, reference, tubelet_backend, tubelet_embedding

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: these tests run the compiled Triton kernels on a GPU"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 1e-5


@pytest.fixture(autouse=True)
def compiled_kernels():
    """The compiled path, not the interpreter (TRITON_INTERPRET=1 would interpret CUDA tensors too)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from vivit_kernels.triton import interpreted
    from vivit_kernels.triton.common import upcast_dot_operands

    if interpreted():
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, not compiled")
    assert not upcast_dot_operands(torch.bfloat16)  # real bf16 dots


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _check(name, ours, plain, truth, dtype):
    """fp32 against float64 at FP32_TOL; fp16/bf16 within twice the plain implementation's error."""
    assert ours.dtype == dtype, name
    error = relative_error(ours, truth)
    if dtype == torch.float32:
        assert error < FP32_TOL, f"{name}: {error:.2e}"
    else:
        limit = 2 * relative_error(plain, truth)
        assert error <= limit, f"{name}: {error:.2e} vs plain {limit / 2:.2e}"


def _qkv(B, H, N, Dh, dtype, generator, device="cuda"):
    """q, k, v views of one packed (B, N, 3, H, Dh) leaf on `device` (drawn on the CPU generator)."""
    qkv = torch.randn(B, N, 3, H, Dh, generator=generator).to(device, dtype).requires_grad_()
    return (*qkv.permute(2, 0, 3, 1, 4).unbind(0), qkv)


def _grads(fn, leaves, grad_out, dtype):
    """fn's output and its inputs' gradients for `grad_out`, with the leaves cast to dtype."""
    xs = [x.detach().to(dtype).requires_grad_() for x in leaves]
    out = fn(*xs)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [x.grad for x in xs]


# (B, H, T, S, Dh, P, layout): ragged sizes, the ViViT-B grid (16 x 196, 12 heads of 64), a class
# token, both layouts, head dims 40 and 80 (not multiples of 16) and 128.
ATTENTION_SHAPES = [
    (2, 4, 5, 37, 40, 0, "time_major"),
    (1, 12, 16, 196, 64, 1, "time_major"),
    (2, 2, 7, 50, 80, 1, "space_major"),
    (1, 2, 3, 70, 128, 2, "time_major"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}H{}T{}S{}D{}P{}-{}".format(*s))
def test_attention_forward_and_gradients_on_the_device(shape, mode, dtype, generator):
    B, H, T, S, Dh, P, layout = shape
    *leaves, _ = _qkv(B, H, P + T * S, Dh, torch.float32, generator)
    dout = torch.randn(leaves[0].shape, generator=generator).cuda()
    grid = dict(num_prefix_tokens=P, layout=layout)
    truth = _grads(lambda *x: masked_attention(*x, T, mode, None, P, layout), leaves, dout, torch.float64)
    plain = _grads(lambda *x: reference.factorised_attention(*x, T, mode, **grid), leaves, dout, dtype)
    ours = _grads(lambda *x: factorised_attention(*x, T, mode, **grid, backend="triton"), leaves, dout, dtype)
    for name, o, p, t in zip(("out", "dq", "dk", "dv"), ours, plain, truth):
        _check(name, o, p, t, dtype)


def _tubelet_leaves(size, D, tubelet, generator):
    B, C, T, H, W = size
    t, h, w = tubelet
    video = torch.randn(B, C, T, H, W, generator=generator)
    weight = torch.randn(D, C, t, h, w, generator=generator) / (C * t * h * w) ** 0.5
    pos = torch.randn(T // t, (H // h) * (W // w), D, generator=generator)
    return [x.cuda() for x in (video, weight, torch.randn(D, generator=generator), pos)]


def _conv3d_tokens(video, weight, bias, pos_embed):
    return F.conv3d(video, weight, bias, stride=weight.shape[2:]).flatten(3).permute(0, 2, 3, 1) + pos_embed


# (B, C, T, H, W), D, tubelet: ragged clips; ViViT-B (16 frames of 224 x 224, 2 x 16 x 16, D = 768),
# whose d(weight) runs split (SPLIT = 3 at B = 2: 3136 tokens).
TUBELET_SHAPES = [
    ((2, 3, 5, 37, 45), 40, (2, 4, 4)),
    ((2, 3, 16, 224, 224), 768, (2, 16, 16)),
    ((1, 1, 7, 33, 50), 100, (3, 5, 7)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_name)
@pytest.mark.parametrize(
    "size, D, tubelet", TUBELET_SHAPES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x)
)
def test_tubelet_forward_and_gradients_on_the_device(size, D, tubelet, dtype, generator):
    leaves = _tubelet_leaves(size, D, tubelet, generator)
    grad_out = torch.randn(_conv3d_tokens(*leaves).shape, generator=generator).cuda()
    truth = _grads(_conv3d_tokens, leaves, grad_out, torch.float64)
    plain = _grads(reference.tubelet_embedding, leaves, grad_out, dtype)
    ours = _grads(lambda *x: tubelet_embedding(*x, backend="triton"), leaves, grad_out, dtype)
    for name, o, p, t in zip(("tokens", "video", "weight", "bias", "pos_embed"), ours, plain, truth):
        _check(name, o, p, t, dtype)


def test_split_weight_gradient_is_deterministic(generator):
    """ViViT-B at 8 clips: d(weight) in 8 chunks (fp16), the same bits on every run."""
    from vivit_kernels.triton import tubelet as kernels

    video, weight, *_ = _tubelet_leaves((8, 3, 16, 224, 224), 768, (2, 16, 16), generator)
    video, weight = video.half(), weight.half()
    grad = torch.randn(8, 8 * 196, 768, generator=generator).cuda().half()
    assert kernels.weight_split(8, 8 * 196, 768, 1536, torch.float16) == 8
    first = kernels.backward_weight(grad.reshape(8, 8, 196, 768), video, weight, True)
    for _ in range(3):
        again = kernels.backward_weight(grad.reshape(8, 8, 196, 768), video, weight, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    truth = torch.einsum("bpd,bpk->dk", grad.double(), _tubes(video.double(), (2, 16, 16)))
    assert relative_error(first[0].reshape(768, -1), truth) < 1e-2


def _tubes(video, tubelet):
    """(B, P, K) tubes of a clip whose sides are multiples of the tubelet."""
    t, h, w = tubelet
    B, C, T, H, W = video.shape
    x = video.reshape(B, C, T // t, t, H // h, h, W // w, w).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, -1, C * t * h * w)


def test_attention_backward_is_deterministic(generator):
    q, k, v, _ = _qkv(2, 12, 16 * 196, 64, torch.float16, generator)
    out = factorised_attention(q, k, v, 16, "split", backend="triton")
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(2):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_tensors_on_another_device_than_the_current_one(generator):
    """Inputs on cuda:1 while cuda:0 is current: every launcher runs under the inputs' device
    (a launch on the current device fails or runs on the wrong stream)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v, qkv = _qkv(1, 4, 3 * 50, 64, torch.float16, generator, device="cuda:1")
    video, weight, bias, pos = (x.to("cuda:1") for x in _tubelet_leaves((2, 3, 4, 32, 32), 64, (2, 8, 8), generator))
    weight.requires_grad_()
    with torch.cuda.device(0):
        out = factorised_attention(q, k, v, 3, "split", backend="triton")
        out.float().sum().backward()
        tokens = tubelet_embedding(video.requires_grad_(), weight, bias, pos, backend="triton")
        tokens.sum().backward()
        torch.cuda.synchronize(1)
    expected = masked_attention(q, k, v, 3, "split")
    assert out.device == qkv.grad.device == torch.device("cuda:1")
    assert relative_error(out, expected) < 1e-2
    assert relative_error(tokens.detach(), _conv3d_tokens(video.detach(), weight.detach(), bias, pos)) < FP32_TOL
    assert weight.grad is not None and video.grad.device == torch.device("cuda:1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_name)
def test_cuda_autocast_runs_the_kernels_in_the_autocast_dtype(dtype, generator):
    """As nn.Conv3d and SDPA under CUDA autocast: fp32 (or fp16 video + fp32 weight) inputs run
    the triton kernels in the autocast dtype; gradients come back in the leaves' dtypes."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    video, weight, bias, pos = _tubelet_leaves((2, 3, 4, 32, 32), 64, (2, 8, 8), generator)
    video = video.half().requires_grad_()
    weight.requires_grad_()
    q, k, v, qkv = _qkv(1, 4, 3 * 50, 64, torch.float32, generator)
    with torch.autocast("cuda", dtype=dtype):
        assert tubelet_backend(video, weight, bias, pos) == attention_backend(q, k, v, 3, "split") == "triton"
        tokens = tubelet_embedding(video, weight, bias, pos)
        conv = F.conv3d(video, weight, bias, stride=(2, 8, 8))
        out = factorised_attention(q, k, v, 3, "split")
        op_tokens = torch.ops.vivit_kernels.triton_tubelet_forward(video.float(), weight, None, None)
    assert tokens.dtype == conv.dtype == out.dtype == op_tokens.dtype == dtype
    (tokens.float().sum() + out.float().sum()).backward()
    assert video.grad.dtype == torch.float16 and weight.grad.dtype == qkv.grad.dtype == torch.float32
    truth = _conv3d_tokens(*(x.detach().double() for x in (video, weight, bias, pos)))
    assert relative_error(tokens.detach(), truth) < 3e-2
    assert relative_error(out.detach(), masked_attention(q, k, v, 3, "split")) < 3e-2
