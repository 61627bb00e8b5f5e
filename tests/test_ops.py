"""The one autograd layer (vivit_kernels/ops/): every backend's ops pass torch.library's checks,
count the stated FLOPs, save only what the contract says, and their fakes describe the real outputs.

Parametrised over the backends with compiled kernels: "cpu" (csrc/) and "triton" (interpreted
on CPU tensors without a GPU).
"""

import pytest
import torch
from conftest import packed_qkv, require_cpu_kernels

from vivit_kernels import factorised_attention, saved_bytes, tubelet_embedding
from vivit_kernels.ops.attention import lse_dtype

BACKENDS = ["cpu", "triton"]
DEVICE = {"cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu":
        require_cpu_kernels()
    else:
        pytest.importorskip("triton", reason="triton is not installed")
    return request.param


def _op(backend: str, name: str):
    return getattr(torch.ops.vivit_kernels, f"{backend}_{name}").default


def _qkv(backend, generator, B=1, H=2, T=3, S=7, Dh=24, P=0):
    q, k, v, qkv = packed_qkv(B, H, P + T * S, Dh, dtype=torch.float32, generator=generator)
    qkv = qkv.detach().to(DEVICE[backend]).requires_grad_()
    return (*qkv.permute(2, 0, 3, 1, 4).unbind(0), qkv)


# (frames, prefix, layout, mode, scale): the ops' grid arguments, without and with prefix tokens.
GRIDS = [(3, 0, "time_major", "split", 0.2), (3, 2, "space_major", "split", 0.2), (3, 1, "time_major", "spatial", 0.3)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"P{g[1]}-{g[2]}-{g[3]}")
def test_attention_ops_pass_opcheck(backend, grid, generator):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of both ops."""
    q, k, v, _ = _qkv(backend, generator, P=grid[1])
    torch.library.opcheck(_op(backend, "attention_forward"), (q, k, v, *grid))
    saved = [x.detach() for x in _op(backend, "attention_forward")(q, k, v, *grid)]
    grad = torch.randn(saved[0].shape, generator=generator).to(saved[0])
    q, k, v = (x.detach() for x in (q, k, v))
    torch.library.opcheck(_op(backend, "attention_backward"), (grad, q, k, v, *saved, *grid))


def test_attention_outputs_have_the_contract_layout(backend, generator):
    """out and every gradient are (B, H, N, Dh) views of (B, N, H, Dh) buffers; lse is float32; the
    averaged prefix rows come per frame, for the spatial heads only."""
    q, k, v, _ = _qkv(backend, generator, H=4, P=2)
    grid = (3, 2, "time_major", "split", 0.2)
    out, lse, prefix_out, prefix_lse = _op(backend, "attention_forward")(q, k, v, *grid)
    assert out.transpose(1, 2).is_contiguous() and lse.shape == q.shape[:3] and lse.dtype == lse_dtype(q.dtype)
    assert prefix_out.shape == (1, 2, 3, 2, 24) and prefix_lse.shape == (1, 2, 3, 2)
    torch.testing.assert_close(out[:, :2, :2], prefix_out.mean(2), rtol=0, atol=0)  # measured bit-identical
    grads = _op(backend, "attention_backward")(torch.ones_like(out), q, k, v, out, lse, prefix_out, prefix_lse, *grid)
    assert all(g.shape == q.shape and g.transpose(1, 2).is_contiguous() for g in grads)


@pytest.mark.parametrize("mode, length", [("joint", 6 * 7), ("spatial", 7), ("temporal", 6), ("split", (7 + 6) / 2)])
def test_flop_counter_counts_the_attention_ops(backend, mode, length, generator):
    from torch.utils.flop_counter import FlopCounterMode

    B, H, T, S, Dh = 2, 4, 6, 7, 16
    q, k, v, _ = _qkv(backend, generator, B, H, T, S, Dh)
    with FlopCounterMode(display=False) as counter:
        factorised_attention(q, k, v, T, mode, backend=backend).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    forward = 4 * B * H * T * S * length * Dh
    assert counts[getattr(torch.ops.vivit_kernels, f"{backend}_attention_forward")] == forward
    assert counts[getattr(torch.ops.vivit_kernels, f"{backend}_attention_backward")] == 2.5 * forward


def test_attention_saves_only_inputs_output_and_lse(backend, generator):
    B, H, T, S, Dh = 1, 2, 5, 14, 32
    q, k, v, qkv = _qkv(backend, generator, B, H, T, S, Dh)
    N = T * S
    saved = saved_bytes(factorised_attention, q, k, v, T, "joint", backend=backend)
    assert saved == qkv.numel() * 4 + B * N * H * Dh * 4 + B * H * N * 4  # the pack (one storage), out, lse
    assert saved < saved_bytes(factorised_attention, q, k, v, T, "joint", backend="reference")


def _tubelet_inputs(backend, generator):
    device = DEVICE[backend]
    video = torch.randn(2, 3, 5, 9, 8, generator=generator).to(device).requires_grad_()
    weight = torch.randn(6, 3, 2, 4, 4, generator=generator).to(device).requires_grad_()
    bias = torch.randn(6, generator=generator).to(device).requires_grad_()
    pos_embed = torch.randn(2 * 2 * 2, 6, generator=generator).to(device).requires_grad_()
    grad = torch.randn(2, 2, 4, 6, generator=generator).to(device)
    return video, weight, bias, pos_embed, grad


@pytest.mark.parametrize(
    "op", ["forward", "forward_plain", "backward_video", "backward_weight", "backward_weight_no_bias", "backward_pos"]
)
def test_tubelet_ops_pass_opcheck(backend, op, generator):
    video, weight, bias, pos_embed, grad = _tubelet_inputs(backend, generator)
    video_, weight_ = video.detach(), weight.detach()
    name, args = {  # the backward ops are not differentiable themselves: no input requires grad there
        "forward": ("forward", (video, weight, bias, pos_embed)),
        "forward_plain": ("forward", (video, weight, None, None)),
        "backward_video": ("backward_video", (grad, video_, weight_)),
        "backward_weight": ("backward_weight", (grad, video_, weight_, True)),
        "backward_weight_no_bias": ("backward_weight", (grad, video_, weight_, False)),
        "backward_pos": ("backward_pos", (grad,)),
    }[op]
    torch.library.opcheck(_op(backend, f"tubelet_{name}"), args)


def test_tubelet_video_gradient_keeps_the_video_layout(backend, generator):
    """A (B, T, C, H, W) decoder output viewed as (B, C, T, H, W) gets its gradient in that memory layout."""
    video = torch.randn(2, 5, 3, 9, 8, generator=generator).to(DEVICE[backend]).transpose(1, 2)
    weight = torch.randn(6, 3, 2, 4, 4, generator=generator).to(video)
    grad = torch.randn(2, 2, 4, 6, generator=generator).to(video)
    dvideo = _op(backend, "tubelet_backward_video")(grad, video, weight)
    assert dvideo.stride() == video.stride()


def test_flop_counter_counts_the_tubelet_gemms(backend, generator):
    from torch.utils.flop_counter import FlopCounterMode

    video, weight, bias, _, _ = _tubelet_inputs(backend, generator)
    gemm = 2 * (2 * 2 * 2 * 2) * 6 * (3 * 2 * 4 * 4)  # 2 * tokens * D * K
    with FlopCounterMode(display=False) as counter:
        tubelet_embedding(video, weight, bias, backend=backend).sum().backward()
    assert counter.get_total_flops() == 3 * gemm  # forward, d(video) and d(weight): three GEMMs of one size
    with FlopCounterMode(display=False) as counter:  # pixels rarely need a gradient: no d(video) then
        tubelet_embedding(video.detach(), weight, bias, backend=backend).sum().backward()
    assert counter.get_total_flops() == 2 * gemm


def test_tubelet_saves_only_the_video_and_the_weight(backend, generator):
    video, weight, bias, pos_embed, _ = _tubelet_inputs(backend, generator)
    saved = saved_bytes(tubelet_embedding, video, weight, bias, pos_embed, backend=backend)
    assert saved == (video.numel() + weight.numel()) * 4  # no unfolded copy, no bias or pos_embed


def test_torch_compile_fullgraph_matches_eager(backend, generator):
    q, k, v, _ = _qkv(backend, generator)
    dout = torch.randn(q.shape, generator=generator).to(q)

    def layer(q, k, v):
        return factorised_attention(q, k, v, 3, "split", backend=backend) * 2.0

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = fn(*xs)
        out.backward(dout)
        results.append([out.detach()] + [x.grad for x in xs])
    for name, a, e in zip(("out", "dq", "dk", "dv"), results[1], results[0]):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"P{g[1]}-{g[2]}-{g[3]}")
def test_packed_ops_pass_opcheck(backend, grid, generator):
    """The packed-projection ops: (B, N, 3 * H * Dh) in, (B, N, H * Dh) out, one gradient buffer."""
    *_, qkv = _qkv(backend, generator, P=grid[1])
    packed = qkv.detach().flatten(2).requires_grad_()  # (B, N, 3 * H * Dh), as a linear layer makes it
    torch.library.opcheck(_op(backend, "attention_packed_forward"), (packed, 2, *grid))
    saved = [x.detach() for x in _op(backend, "attention_packed_forward")(packed, 2, *grid)]
    assert saved[0].shape == (1, packed.shape[1], 2 * 24) and saved[0].is_contiguous()
    grad = torch.randn(saved[0].shape, generator=generator).to(saved[0])
    torch.library.opcheck(_op(backend, "attention_packed_backward"), (grad, packed.detach(), *saved, 2, *grid))


def test_packed_op_writes_the_projection_gradient_in_place(backend, generator):
    """The packed path's backward is the op's kernel: no stack of three gradients into the pack,
    no copy of it (the q/k/v path through autograd's unbind has both)."""
    from vivit_kernels import factorised_attention_packed
    from vivit_kernels.ops.attention import unpack_qkv

    *_, qkv = _qkv(backend, generator, H=4, P=1)
    packed = qkv.detach().flatten(2).requires_grad_()

    def backward_ops(fn) -> set[str]:
        out = fn()
        with torch.profiler.profile() as profile:
            out.backward(torch.ones_like(out))
        return {event.name for event in profile.events()}

    packed_ops = backward_ops(
        lambda: factorised_attention_packed(packed, 4, 3, "split", num_prefix_tokens=1, backend=backend)
    )
    unbound = backward_ops(
        lambda: factorised_attention(*unpack_qkv(packed, 4), 3, "split", num_prefix_tokens=1, backend=backend)
    )
    assert f"vivit_kernels::{backend}_attention_packed_backward" in packed_ops
    assert "aten::stack" in unbound and not {"aten::stack", "aten::cat"} & packed_ops


def test_packed_op_saves_the_projection_output_and_lse(backend, generator):
    from vivit_kernels import factorised_attention_packed

    *_, qkv = _qkv(backend, generator, H=4, T=5, S=14, Dh=32)
    packed = qkv.detach().flatten(2).requires_grad_()
    saved = saved_bytes(factorised_attention_packed, packed, 4, 5, "split", backend=backend)
    B, N, width = packed.shape
    assert saved == (B * N * width + B * N * width // 3 + B * 4 * N) * 4  # qkv, out, lse: O(N) per head


def test_flop_counter_counts_the_packed_ops(backend, generator):
    from torch.utils.flop_counter import FlopCounterMode

    from vivit_kernels import factorised_attention_packed

    *_, qkv = _qkv(backend, generator, B=2, H=4, T=6, S=7, Dh=16)
    packed = qkv.detach().flatten(2).requires_grad_()
    with FlopCounterMode(display=False) as counter:
        factorised_attention_packed(packed, 4, 6, "split", backend=backend).sum().backward()
    forward = 4 * 2 * 4 * 6 * 7 * (7 + 6) / 2 * 16
    assert counter.get_total_flops() == 3.5 * forward


@pytest.mark.parametrize(
    "dtype, lse", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
)
def test_fake_kernels_keep_the_log_sum_exp_in_float32_for_half_inputs(dtype, lse):
    """What torch.compile traces on a GPU: the fakes of both forward ops at half precision give the
    outputs in the inputs' dtype and the log-sum-exps (the rows' and the averaged prefix's) in float32."""
    B, H, T, S, Dh, P = 1, 4, 3, 5, 8, 2
    grid = (T, P, "time_major", "split", 0.3)
    q = torch.empty(B, H, P + T * S, Dh, device="meta", dtype=dtype)
    qkv = torch.empty(B, P + T * S, 3 * H * Dh, device="meta", dtype=dtype)
    for name in BACKENDS:
        out, row_lse, prefix_out, prefix_lse = _op(name, "attention_forward")(q, q, q, *grid)
        packed = _op(name, "attention_packed_forward")(qkv, H, *grid)
        assert [t.dtype for t in (out, row_lse, prefix_out, prefix_lse)] == [dtype, lse, dtype, lse]
        assert [t.dtype for t in packed] == [dtype, lse, dtype, lse]
        assert prefix_lse.shape == (B, H // 2, T, P) and packed[3].shape == (B, H // 2, T, P)
