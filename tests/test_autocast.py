"""Autocast: the public ops follow torch's policy (tubelet_embedding as convolution,
factorised_attention as SDPA), and so do the custom ops themselves (vivit_kernels/ops/).

Run under CPU autocast with bf16, which follows the same rules as CUDA autocast for convolution
and SDPA: floating inputs (not float64) cast to the region's dtype. The cast happens before a
backend is chosen, so "auto" picks one that takes bf16 (the cpu backend takes fp32/fp64 only:
attention runs sdpa, the tubelet the reference). `test_cuda_kernels.py` repeats the essentials
under CUDA autocast on a GPU.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import masked_attention, relative_error, require_cpu_kernels

from vivit_kernels import attention_backend, factorised_attention, tubelet_backend, tubelet_embedding

# A few bf16 roundings (2^-8 each) of inputs and output, accumulated in fp32: an fp32 path that
# ignored autocast would be far inside this; a wrong cast or a wrong kernel far outside it.
BF16_TOL = 3e-2
BACKENDS = ["auto", "triton"]  # triton: interpreted here, bf16 kernels


def _autocast(dtype=torch.bfloat16):
    return torch.autocast("cpu", dtype=dtype)


def _backend(backend: str) -> str:
    if backend == "triton":
        _interpreted_triton()
    return backend


def _interpreted_triton() -> None:
    """Skip unless the Triton kernels run interpreted, on CPU tensors, here."""
    pytest.importorskip("triton", reason="triton is not installed")
    from vivit_kernels.triton import interpreted

    if not interpreted():
        pytest.skip("the Triton kernels run compiled, on CUDA tensors: test_cuda_kernels.py checks CUDA autocast")


def _tubelet_leaves(generator, video_dtype=torch.float32):
    """video (2, 3, 5, 17, 21), weight for 2 x 4 x 4 tubelets and D = 24, bias, pos_embed: leaves."""
    video = torch.randn(2, 3, 5, 17, 21, generator=generator).to(video_dtype)
    weight = torch.randn(24, 3, 2, 4, 4, generator=generator) / 96**0.5
    bias, pos = torch.randn(24, generator=generator), torch.randn(2, 20, 24, generator=generator)
    return [x.requires_grad_() for x in (video, weight, bias, pos)]


def _conv3d_tokens(video, weight, bias, pos_embed):
    tokens = F.conv3d(video, weight, bias, stride=weight.shape[2:]).flatten(3).permute(0, 2, 3, 1)
    return tokens + pos_embed


def _float64_grads(fn, leaves, grad_out):
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    out = fn(*leaves64)
    return out.detach(), torch.autograd.grad(out, leaves64, grad_out.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tubelet_under_bf16_autocast_runs_in_bf16_like_conv3d(backend, generator):
    leaves = _tubelet_leaves(generator)
    with _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's fallback warning: no fused bf16 tubelet on CPU
        chosen = tubelet_backend(*leaves, backend=_backend(backend))
        out = tubelet_embedding(*leaves, backend=backend)
        conv = F.conv3d(*leaves[:3], stride=(2, 4, 4))
    assert chosen == ("reference" if backend == "auto" else "triton")
    assert out.dtype == conv.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape, generator=generator)
    out.backward(grad_out.to(out.dtype))
    expected, expected_grads = _float64_grads(_conv3d_tokens, leaves, grad_out)
    assert relative_error(out.detach(), expected) < BF16_TOL
    for name, leaf, want in zip(("video", "weight", "bias", "pos_embed"), leaves, expected_grads):
        assert leaf.grad.dtype == torch.float32, name  # the gradient of the cast: the leaf's dtype
        assert relative_error(leaf.grad, want) < BF16_TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_video_with_fp32_weight_works_under_autocast(backend, generator):
    """As nn.Conv3d: the video and the parameters meet in the autocast dtype. Without autocast
    the mixed dtypes stay an error."""
    leaves = _tubelet_leaves(generator, video_dtype=torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        tubelet_embedding(*leaves, backend=_backend(backend))
    with _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tubelet_embedding(*leaves, backend=backend)
        conv = F.conv3d(*leaves[:3], stride=(2, 4, 4))
    assert out.dtype == conv.dtype == torch.bfloat16
    out.float().sum().backward()
    assert leaves[0].grad.dtype == torch.float16 and leaves[1].grad.dtype == torch.float32
    assert relative_error(out.detach(), _conv3d_tokens(*(x.detach().double() for x in leaves))) < BF16_TOL


def _attention_leaves(generator, dtype=torch.float32):
    """q, k, v (1, 4, 1 + 3 * 7, 16) with a prefix token: leaves."""
    return [torch.randn(1, 4, 22, 16, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_under_bf16_autocast_runs_in_bf16_like_sdpa(backend, generator):
    q, k, v = leaves = _attention_leaves(generator)
    grid = dict(frames=3, mode="split", num_prefix_tokens=1)
    with _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's fallback warning: sdpa for bf16 on CPU
        chosen = attention_backend(q, k, v, **grid, backend=_backend(backend))
        out = factorised_attention(q, k, v, **grid, backend=backend)
        sdpa = F.scaled_dot_product_attention(q, k, v)
    assert chosen == ("sdpa" if backend == "auto" else "triton")
    assert out.dtype == sdpa.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape, generator=generator)
    out.backward(grad_out.to(out.dtype))
    expected, expected_grads = _float64_grads(
        lambda q, k, v: masked_attention(q, k, v, 3, "split", prefix=1), leaves, grad_out
    )
    assert relative_error(out.detach(), expected) < BF16_TOL
    for name, leaf, want in zip("qkv", leaves, expected_grads):
        assert leaf.grad.dtype == torch.float32, name
        assert relative_error(leaf.grad, want) < BF16_TOL, name


def test_float64_is_left_alone_by_autocast(generator):
    """Autocast does not cast float64: the call runs as it would outside the region."""
    q, k, v = _attention_leaves(generator, torch.float64)
    video, weight, bias, pos = (x.detach().double() for x in _tubelet_leaves(generator))
    outside = attention_backend(q, k, v, 3, "split", num_prefix_tokens=1), tubelet_backend(video, weight, bias, pos)
    with _autocast():
        inside = attention_backend(q, k, v, 3, "split", num_prefix_tokens=1), tubelet_backend(video, weight, bias, pos)
        out = factorised_attention(q, k, v, 3, "split", num_prefix_tokens=1)
        tokens = tubelet_embedding(video, weight, bias, pos)
    assert inside == outside
    assert out.dtype == tokens.dtype == torch.float64


def test_under_torch_compile_autocast_casts_while_tracing(generator):
    q, k, v = (x.detach() for x in _attention_leaves(generator))

    def attend(q, k, v):
        return factorised_attention(q, k, v, 3, "split", num_prefix_tokens=1, backend="sdpa")

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")  # dynamo and autograd tracing, no codegen
    with _autocast():
        eager, traced = attend(q, k, v), compiled(q, k, v)
    assert eager.dtype == traced.dtype == torch.bfloat16
    assert torch.equal(eager, traced)


# ---------------------------------------------------------------------------------------------
# The custom ops themselves: torch.ops.vivit_kernels.* called directly.


def _op(name: str):
    return getattr(torch.ops.vivit_kernels, name).default


def test_triton_ops_cast_to_the_autocast_dtype(generator):
    """Registered for CUDA autocast (what a GPU runs) and CPU autocast (the interpreter): the
    region's dtype, bf16 here, fp16 under an fp16 region."""
    _interpreted_triton()
    for name in ("triton_attention_forward", "triton_tubelet_forward"):
        for key in ("AutocastCUDA", "AutocastCPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vivit_kernels::{name}", key), (name, key)
    video, weight, bias, pos = _tubelet_leaves(generator)
    q, k, v = _attention_leaves(generator)
    for dtype in (torch.bfloat16, torch.float16):
        with _autocast(dtype):
            tokens = _op("triton_tubelet_forward")(video, weight, bias, pos.reshape(40, 24))
            out, lse, *_ = _op("triton_attention_forward")(q, k, v, 3, 1, "time_major", "split", 0.25)
        assert tokens.dtype == out.dtype == dtype
        assert lse.dtype == torch.float32
    tokens.float().sum().backward()  # through the casts, back to the fp32 leaves
    assert weight.grad.dtype == torch.float32 and video.grad.dtype == torch.float32


def test_cpu_ops_run_in_float32_under_cpu_autocast(generator):
    """The C++ kernels take fp32/fp64 only: under CPU autocast their ops cast floating inputs to
    fp32 (bf16 activations work, the output is fp32); float64 stays float64."""
    require_cpu_kernels()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("vivit_kernels::cpu_attention_forward", "AutocastCUDA")
    q, k, v = (x.detach().bfloat16() for x in _attention_leaves(generator))
    video, weight, bias, pos = (x.detach().bfloat16() for x in _tubelet_leaves(generator))
    attention_args = (3, 1, "time_major", "split", 0.25)
    with pytest.raises(RuntimeError):  # without autocast bf16 is refused
        _op("cpu_attention_forward")(q, k, v, *attention_args)
    with _autocast():
        out, *_ = _op("cpu_attention_forward")(q, k, v, *attention_args)
        tokens = _op("cpu_tubelet_forward")(video, weight, bias, pos.reshape(40, 24))
        out64, *_ = _op("cpu_attention_forward")(q.double(), k.double(), v.double(), *attention_args)
    assert out.dtype == tokens.dtype == torch.float32
    assert out64.dtype == torch.float64
    expected = masked_attention(q, k, v, 3, "split", 0.25, prefix=1)
    assert relative_error(out, expected) < 1e-5  # fp32 on the bf16 values
