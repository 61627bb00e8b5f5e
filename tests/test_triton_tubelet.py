"""The Triton tubelet-embedding kernels (vivit_kernels/triton/tubelet.py) against F.conv3d.

Without a GPU they run under Triton's interpreter on CPU tensors; the same kernels are compiled
for sm_80/sm_90 by the inspection tool. The ops' own checks (opcheck, FLOP formulas, saved
tensors) are in test_ops.py, for every backend.
Shapes are chosen so that tokens per clip, D and K are not multiples of the interpreter's
blocks (16 x 16 x 32) and span several of them.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_near_oracle, check_tubelet_distinct_layouts, in_layout, relative_error

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from vivit_kernels import TubeletEmbedding, reference, tubelet_embedding
from vivit_kernels.triton import interpreted
from vivit_kernels.triton import tubelet as kernels

needs_triton_device = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreted()),
    reason="Triton needs a CUDA device, or TRITON_INTERPRET unset or 1 to interpret",
)
pytestmark = needs_triton_device


def _triton(video, weight, bias=None, pos_embed=None):
    return tubelet_embedding(video, weight, bias, pos_embed, backend="triton")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# fp32 against float64 (bound: conftest.TOLERANCES): the interpreter's fp32 dots are exact; on a
# GPU each fp32 dot is three tf32 products (tf32x3), within a few 1e-7 per product. An indexing
# mistake gives errors of order 1.

# (C, tubelet, (B, T, H, W), D): C in {1, 3}; clips that are not multiples of the tubelet.
CASES = [
    (3, (2, 4, 4), (2, 5, 17, 21), 40),  # 40 tokens per clip, K = 96, one frame dropped
    (1, (3, 5, 7), (1, 7, 11, 15), 24),  # K = 105, every axis has a remainder
    (3, (1, 8, 8), (2, 3, 17, 26), 20),  # the uniform-frame tokeniser's shape of filter
    (2, (1, 2, 3), (1, 2, 5, 7), 3),  # D and K far below one block
]


def _inputs(C, tubelet, size, D, generator, *, dtype=torch.float32, layout="contiguous"):
    """video (B, C, T, H, W) in `layout`, weight, bias, pos_embed (nt, S', D), on the test device."""
    B, T, H, W = size
    device = _device()

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)

    if layout == "contiguous":
        video = randn(B, C, T, H, W)
    elif layout == "permuted":  # a decoder's (B, T, C, H, W) output, viewed as (B, C, T, H, W)
        video = randn(B, T, C, H, W).permute(0, 2, 1, 3, 4)
    elif layout == "strided":  # every other column of a wider clip: no dense layout at all
        video = randn(B, C, T, H, 2 * W)[..., ::2]
    else:
        raise ValueError(layout)
    t, h, w = tubelet
    weight = randn(D, C, t, h, w) / (C * t * h * w) ** 0.5
    return video, weight, randn(D), randn(T // t, (H // h) * (W // w), D)


def _conv3d_tokens(video, weight, bias, pos_embed):
    """The oracle: F.conv3d with stride == kernel, rearranged to time-major tokens (B, nt, S', D)."""
    tokens = F.conv3d(video, weight, bias, stride=weight.shape[2:]).flatten(3).permute(0, 2, 3, 1)
    return tokens + pos_embed


def _grads(fn, leaves, grad_out):
    """fn's output and the gradients of all its inputs for the output gradient `grad_out`."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def _float64(tensors):
    return [x.detach().cpu().double() for x in tensors]


def _grad_out(leaves, generator):
    shape = _conv3d_tokens(*_float64(leaves)).shape
    return torch.randn(shape, dtype=torch.float64, generator=generator).to(_device())


@pytest.mark.parametrize("C, tubelet, size, D", CASES)
def test_forward_and_every_gradient_match_conv3d(C, tubelet, size, D, generator):
    leaves = _inputs(C, tubelet, size, D, generator)
    grad_out = _grad_out(leaves, generator)
    expected, expected_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    out, grads = _grads(_triton, leaves, grad_out)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert_near_oracle(out, expected, "triton", "tokens", op="tubelet")
    for name, grad, want in zip(("video", "weight", "bias", "pos_embed"), grads, expected_grads):
        assert grad.shape == want.shape, name
        assert_near_oracle(grad, want, "triton", name, op="tubelet")


@pytest.mark.parametrize("layout", ["permuted", "strided"])
def test_strided_video_is_read_in_place(layout, generator):
    leaves = _inputs(3, (2, 4, 4), (2, 5, 9, 13), 24, generator, layout=layout)
    grad_out = _grad_out(leaves, generator)
    expected, expected_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    video, *params = leaves
    video.requires_grad_()  # a leaf view: the kernel gets its strides, no contiguous copy is made
    out = _triton(video, *params)
    out.backward(grad_out.float())
    assert_near_oracle(out.detach(), expected, "triton", "tokens", op="tubelet")
    assert_near_oracle(video.grad, expected_grads[0], "triton", "video", op="tubelet")
    if layout == "permuted":  # the gradient comes back in the decoder's memory layout
        assert video.grad.stride() == video.stride()


@pytest.mark.parametrize("shift", [1, 2])
def test_inputs_and_output_gradient_in_layouts_of_their_own(shift, generator):
    """video, weight, pos_embed and the output gradient each in a layout of its own (the video
    padded, then offset: d(video) is then a dense buffer with strides of its own)."""
    check_tubelet_distinct_layouts("triton", shift, generator, torch.float32, _device())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_the_reference_error(dtype, generator):
    """fp16/bf16 tokens and gradients are at most 2x as far from the float64 truth as the
    reference implementation run in the same precision.

    Under the interpreter, bf16 tl.dot is wrong (triton-lang/triton#11584) and fp32 -> bf16
    conversions truncate, so the kernels get `UPCAST=True` there (common.upcast_dot_operands):
    they dot fp32 copies of the bf16 tiles and round to nearest even by hand before storing. bf16
    loads and stores still run; the bf16 tensor-core dot is checked by compiling for sm_80/sm_90
    (test_kernels_compile_for_sm80_and_sm90_without_spills)."""
    leaves = _inputs(3, (2, 4, 4), (2, 5, 17, 21), 40, generator, dtype=dtype)
    grad_out = _grad_out(leaves, generator)
    truth, truth_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    ref, ref_grads = _grads(reference.tubelet_embedding, [x.cpu() for x in leaves], grad_out.cpu())
    out, grads = _grads(_triton, leaves, grad_out)
    assert out.dtype == dtype
    # Measured ratio 1.0 (seeds 0-2): fp32 accumulation and one rounding, as in the reference.
    assert relative_error(out.cpu(), truth) <= 2 * relative_error(ref, truth)
    for name, grad, ref_grad, want in zip(("video", "weight", "bias", "pos_embed"), grads, ref_grads, truth_grads):
        assert grad.dtype == dtype, name
        assert relative_error(grad.cpu(), want) <= 2 * relative_error(ref_grad, want), name


def test_poisoned_outputs_and_gradients_are_fully_written(generator):
    """Every launcher writes every element of its output: NaN buffers come back NaN-free, and
    video elements dropped by the floor semantics get exactly zero gradient."""
    leaves = _inputs(1, (3, 5, 7), (2, 7, 11, 15), 24, generator)
    video, weight, bias, pos_embed = leaves
    grad_out = _grad_out(leaves, generator)
    expected, conv_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    nan = float("nan")
    pos = pos_embed.reshape(-1, pos_embed.shape[-1])  # the launchers take it as (P, D)
    out = kernels.forward(video, weight, bias, pos, out=torch.full(expected.shape, nan).to(video))
    assert_near_oracle(out, expected, "triton", "tokens", op="tubelet")

    grad_out = grad_out.float()
    # d(video) into a buffer of its own strides (a slice of a larger one), unlike the video's
    dvideo = kernels.backward_video(grad_out, video, weight, dvideo=in_layout(torch.full_like(video, nan), "offset"))
    dweight, dbias = kernels.backward_weight(
        grad_out, video, weight, True, dweight=torch.full_like(weight, nan), dbias=torch.full_like(bias, nan)
    )
    dpos = kernels.backward_pos(grad_out, dpos=torch.full_like(pos, nan)).reshape(pos_embed.shape)
    for name, grad, want in zip(("video", "weight", "bias", "pos_embed"), (dvideo, dweight, dbias, dpos), conv_grads):
        assert not grad.isnan().any().item(), name
        assert_near_oracle(grad, want, "triton", name, op="tubelet")
    # T = 7, H = 11, W = 15 with a 3 x 5 x 7 tubelet: frame 6, row 10 and column 14 are dropped.
    assert (dvideo[:, :, 6:] == 0).all() and (dvideo[:, :, :, 10:] == 0).all() and (dvideo[..., 14:] == 0).all()


@pytest.fixture
def allocations(monkeypatch):
    """Every buffer the tubelet launchers allocate comes NaN-filled; their shapes are recorded."""
    shapes = []

    def poisoned(shape, dtype, device):
        shapes.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_alloc", poisoned)
    return shapes


# (C, tubelet, (B, T, H, W), D, split): 40 tokens per clip are 3 interpreter tiles of 16, 6 in
# all: 4 chunks of 2 tiles (one of them straddling the two clips, the last one empty) and 5
# chunks (two empty); 7 tiles of a 100-token clip in 3 uneven chunks.
SPLIT_CASES = [
    (3, (2, 4, 4), (2, 5, 17, 21), 40, 4),
    (3, (2, 4, 4), (2, 5, 17, 21), 40, 5),
    (1, (1, 5, 7), (1, 4, 25, 35), 24, 3),
]


@pytest.mark.parametrize("C, tubelet, size, D, split", SPLIT_CASES)
def test_weight_gradient_split_over_tokens_matches_conv3d(C, tubelet, size, D, split, allocations, generator):
    """d(weight) and d(bias) with the token reduction cut into `split` chunks of fp32 partials
    (poisoned, like the outputs) match F.conv3d's gradients in float64."""
    leaves = _inputs(C, tubelet, size, D, generator)
    video, weight, bias, _ = leaves
    grad_out = _grad_out(leaves, generator)
    _, conv_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    dweight, dbias = kernels.backward_weight(grad_out.float(), video, weight, True, split=split)
    assert (split, D, weight[0].numel()) in allocations and (split, D) in allocations
    assert_near_oracle(dweight, conv_grads[1], "triton", "weight", op="tubelet")
    assert_near_oracle(dbias, conv_grads[2], "triton", "bias", op="tubelet")
    if split == 4:  # without d(bias): no bias partials
        allocations.clear()
        (dweight_only,) = kernels.backward_weight(grad_out.float(), video, weight, False, split=split)
        assert (split, D) not in allocations
        assert_near_oracle(dweight_only, conv_grads[1], "triton", "weight", op="tubelet")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_weight_gradient_in_low_precision(dtype, allocations, generator):
    """fp16/bf16 inputs: the partials stay fp32 and the sum is rounded once, so the split
    gradient is as close to the float64 truth as the one-pass one (within 2x the reference's)."""
    leaves = _inputs(3, (2, 4, 4), (2, 5, 17, 21), 40, generator, dtype=dtype)
    video, weight, bias, _ = leaves
    grad_out = _grad_out(leaves, generator)
    _, truth = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    _, ref = _grads(reference.tubelet_embedding, [x.cpu() for x in leaves], grad_out.cpu())
    dweight, dbias = kernels.backward_weight(grad_out.to(dtype), video, weight, True, split=4)
    assert dweight.dtype == dbias.dtype == dtype
    # Measured ratio 1.0 (seeds 0-2)
    assert relative_error(dweight.cpu(), truth[1]) <= 2 * relative_error(ref[1], truth[1])
    assert relative_error(dbias.cpu(), truth[2]) <= 2 * relative_error(ref[2], truth[2])


def test_weight_split_rule():
    """SPLIT fills about four waves of 132 SMs with the config that launches the fewest
    programs, keeps at least 1024 tokens per chunk, and is 1 for small problems."""
    D, K = 768, 3 * 2 * 16 * 16  # ViViT-B: 6 x 12 = 72 tiles of 128 x 128
    assert kernels.weight_split(8, 16 * 196, D, K, torch.float16) == 8  # 576 programs: 4.4 waves of 132
    assert kernels.weight_split(8, 16 * 196, D, K, torch.float32) == 4  # fp32 tiles are at most 128 x 64: 144
    assert kernels.weight_split(1, 16 * 196, D, K, torch.float16) == 3  # 3136 tokens: chunks of >= 1024
    assert kernels.weight_split(1, 8 * 196, D, K, torch.bfloat16) == 1  # 1568 tokens: one pass
    assert kernels.weight_split(256, 16 * 196, 16, 16, torch.float16) == 4 * 132  # one tile: four full waves
    with pytest.raises(ValueError, match="split"):
        kernels.backward_weight(
            torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2, 2), torch.zeros(2, 1, 1, 2, 2), True, split=0
        )


def test_launcher_splits_by_the_rule(allocations, generator):
    """Without `split`, a problem of 2048 tokens runs in weight_split's 2 chunks (one 16 x 32 tile of
    d(weight), so the interpreter stays quick), and still matches F.conv3d."""
    leaves = _inputs(2, (1, 4, 4), (1, 8, 64, 64), 16, generator)
    video, weight, bias, _ = leaves
    assert kernels.weight_split(1, 2048, 16, 32, torch.float32) == 2
    grad_out = _grad_out(leaves, generator)
    _, conv_grads = _grads(_conv3d_tokens, _float64(leaves), grad_out.cpu())
    dweight, dbias = kernels.backward_weight(grad_out.float(), video, weight, True)
    assert (2, 16, 32) in allocations
    assert_near_oracle(dweight, conv_grads[1], "triton", "weight", op="tubelet")
    assert_near_oracle(dbias, conv_grads[2], "triton", "bias", op="tubelet")


def test_public_api_and_module_run_on_triton(generator):
    video, weight, bias, pos_embed = leaves = _inputs(3, (2, 4, 4), (1, 4, 9, 13), 24, generator)
    expected = _conv3d_tokens(*_float64(leaves)).to(video.device)
    out = tubelet_embedding(video, weight, bias, pos_embed.reshape(1, -1, 24), backend="triton")
    assert_near_oracle(out, expected, "triton", "tokens", op="tubelet")

    embed = TubeletEmbedding(3, 24, (2, 4, 4), backend="triton").to(_device())
    with torch.no_grad():
        embed.proj.weight.copy_(weight)
        embed.proj.bias.copy_(bias)
    tokens = embed(video.requires_grad_(), pos_embed)
    assert_near_oracle(tokens.detach(), expected, "triton", "tokens", op="tubelet")
    tokens.sum().backward()
    assert embed.proj.weight.grad is not None and video.grad is not None


def test_the_inspection_records_every_kernel_dtype_and_candidate():
    """`inspect` compiles what the launchers launch: at ViViT-B sizes every kernel runs in every
    dtype with its GPU autotune candidates (not the interpreter's one config), d(weight) split."""
    script = (
        "import json\n"
        "from vivit_kernels.triton import inspect\n"
        "print(json.dumps([dict(fn=l.fn.__name__, dtype=l.meta['dtype'], partial=l.kwargs.get('PARTIAL'),\n"
        "    configs=[c.kwargs for c in l.autotuner.configs] if l.autotuner else None)\n"
        "    for l in inspect.record('tubelet')]))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    launches = json.loads(result.stdout.splitlines()[-1])
    recorded = {(r["fn"], r["dtype"]) for r in launches}
    for kernel in ("tubelet_fwd", "tubelet_bwd_video", "tubelet_bwd_weight", "tubelet_bwd_pos"):
        assert {(f"{kernel}_kernel", dtype) for dtype in ("fp32", "fp16", "bf16")} <= recorded, kernel
    for r in launches:
        if r["fn"] == "tubelet_bwd_weight_kernel":
            assert r["partial"] is True
        if r["fn"] != "tubelet_bwd_pos_kernel":
            kernel = r["fn"].removeprefix("tubelet_").removesuffix("_kernel")
            bits = "32" if r["dtype"] == "fp32" else "16"
            assert r["configs"] == [c.kwargs for c in kernels._GPU_CONFIGS[kernel][bits]], r
            # tl.dot needs every dimension >= 16 on a GPU
            assert all(v >= 16 for c in r["configs"] for k, v in c.items() if k.startswith("BLOCK_")), r


# The heaviest autotune config of each kernel (most registers in the full inspection), per
# precision family, plus the reduction kernel: `python -m vivit_kernels.triton.inspect --kernels
# tubelet` compiles all of them. The inspection runs the launchers at ViViT-B sizes, where d(weight)
# is split (PARTIAL).
INSPECT_SUBSET = (
    r"tubelet_fwd\[(fp16|bf16),.* BLOCK_M=128, BLOCK_N=128, BLOCK_K=32,"
    r"|tubelet_fwd\[fp32,.* BLOCK_M=64, BLOCK_N=128, BLOCK_K=16,"
    r"|tubelet_bwd_video\[(fp16|bf16),.* BLOCK_M=128, BLOCK_K=64, BLOCK_D=64,"
    r"|tubelet_bwd_video\[fp32,.* BLOCK_M=64, BLOCK_K=128, BLOCK_D=16,"
    r"|tubelet_bwd_weight\[(fp16|bf16),.* BLOCK_D=128, BLOCK_K=128, BLOCK_M=32,"
    r"|tubelet_bwd_weight\[fp32,.* BLOCK_D=128, BLOCK_K=64, BLOCK_M=16,"
    r"|tubelet_bwd_pos\[fp16,"
)


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    """The GPU compiler's view, which the interpreter lacks: tl.dot shapes, spills, tensor cores."""
    # A fresh process: Triton decides interpreted-or-compiled when a kernel module is imported.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    command = [
        sys.executable,
        "-m",
        "vivit_kernels.triton.inspect",
        "--json",
        "--jobs",
        "2",
        "--kernels",
        "tubelet",
        "--arch",
        "80",
        "90",
        "--filter",
        INSPECT_SUBSET,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.stdout, result.stderr
    rows = json.loads(result.stdout.splitlines()[-1])
    assert {(r["name"].split("[")[0], r["arch"]) for r in rows} == {
        (kernel, arch)
        for kernel in ("tubelet_fwd", "tubelet_bwd_video", "tubelet_bwd_weight", "tubelet_bwd_pos")
        for arch in (80, 90)
    }
    assert len(rows) == 2 * 10
    assert all("PARTIAL=True" in r["name"] for r in rows if r["name"].startswith("tubelet_bwd_weight"))
    for r in rows:
        where = f"{r['name']} sm_{r['arch']}"
        assert not r["error"], f"{where}: {r['error']}"
        assert r["spill_loads"] == 0 and r["spill_stores"] == 0, where
        if not r["name"].startswith("tubelet_bwd_pos"):  # the batch sum has no product
            # HMMA/HGMMA for fp16/bf16, and for fp32 too (tf32x3)
            assert r["tensor_core"] > 0, where
