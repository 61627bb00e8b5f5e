"""Tubelet embedding as an implicit-im2col GEMM: forward and backward Triton kernels.

The embedding is `F.conv3d(video, weight, bias, stride=(t, h, w))` with kernel == stride, i.e.

    tokens[m, d] = sum_k A[m, k] * W[d, k]  (+ bias[d] + pos_embed[m mod nt*S', d])

with m = ((b * nt + i) * nh + j) * nw + l a token (time-major, as the attention kernels read
them) and k = ((c * t + dt) * h + dh) * w + dw a position inside the tube. A is never stored:
each tile is gathered from the video through its five strides (a (B, T, C, H, W) decoder output
permuted to (B, C, T, H, W) is read in place), so the only large tensors touched are the video
and the tokens. Like Conv3d, trailing frames, rows and columns that do not fill a whole tubelet
are dropped (nt = T // t, nh = H // h, nw = W // w) and get a zero gradient.

Backward, with dY the token gradient (M, D):
- d(video)[A-position (m, k)] = (dY W)[m, k]: tubes do not overlap (kernel == stride), so every
  video element receives at most one value; no atomics. Dropped positions are zeroed.
- d(weight) = dY^T A, with A gathered again (a GEMM over the M tokens, split into chunks of
  tokens summed in a fixed order so the grid fills the GPU: see `weight_split`), d(bias) = column
  sums of dY (fused into the same loop), d(pos_embed) = dY summed over the batch.
Autograd saves the video and the weight only.

The tubelet (t, h, w) is a compile-time constant (one compilation per tubelet shape, and a
model has one), so the index maps divide by constants and, with a unit-stride W axis, the
compiler sees runs of w contiguous elements it can load as vectors.

Cost at ViViT-B input (1 x 3 x 32 x 224 x 224, tubelet 2 x 16 x 16, D = 768):
M = 16 * 14 * 14 = 3136 tokens, K = 3 * 2 * 16 * 16 = 1536, so the forward is
2 * M * D * K = 7.40 GFLOP. In fp16 it reads the video once (4.82 M elements: 9.6 MB), the
weight (1.18 M: 2.4 MB) and writes the tokens (2.41 M: 4.8 MB): 16.8 MB, ~440 FLOP/byte
(21.6 MB and ~340 FLOP/byte when it also reads a pos_embed). That is above the ridge point of an
A100 (312 TFLOP/s / 2.0 TB/s = 156 FLOP/byte) and of an H100 SXM (~990 / 3.35 = 295): the op is
compute-bound, and the gather costs no extra DRAM traffic (tiles are re-read across the D/BLOCK_N
column blocks from L2). An explicit im2col would write and read another 4.82 M elements
(19 MB in fp16) and keep them as activation memory for backward. fp32 inputs run each dot as
three tf32 tensor-core products (`input_precision="tf32x3"`, fp32-level accuracy; a third of
the tf32 rate, ~52 TFLOP/s on an A100, still compute-bound).
The backward is two GEMMs of the same size, 14.8 GFLOP (d(video) is skipped when the video does
not require a gradient, the usual case for pixels: 7.4 GFLOP).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..checks import TubeletShape
from .common import autotune_configs, cast_rounded, on_input_device, upcast_dot_operands

# ----------------------------------------------------------------------------------------------
# Index maps: a token p of a clip and a tube position k to element offsets inside one clip.
# Offsets inside a clip are int32 (the backend declares `INT32_MAX` as its limit, so a clip
# spanning more never reaches these kernels); the batch offset, which can exceed 2^31, is applied to the base
# pointer in int64.


@triton.jit
def _token_offsets(p, nh, nw, t, h, w, stride_t, stride_h, stride_w):
    """Offset of the first element of token p's tube: p = (i * nh + j) * nw + l."""
    l = p % nw
    r = p // nw
    j = r % nh
    i = r // nh
    return i * t * stride_t + j * h * stride_h + l * w * stride_w  # mutant: tri-tube-corner


@triton.jit
def _tube_offsets(k, t, h, w, stride_c, stride_t, stride_h, stride_w):
    """Offset of position k = ((c * t + dt) * h + dh) * w + dw inside a tube, as nn.Conv3d's
    weight orders it; dw innermost so a tile row walks the video's unit-stride W axis."""
    dw = k % w
    r = k // w
    dh = r % h
    r = r // h
    dt = r % t
    c = r // t
    return c * stride_c + dt * stride_t + dh * stride_h + dw * stride_w  # mutant: tri-tube-w-stride


# ----------------------------------------------------------------------------------------------
# Kernels. Block sizes come from autotune configs; every edge (tokens, D, K) is masked. Token
# tiles never straddle two clips (grid axis 0 enumerates (clip, token block)), so the clip's base
# pointer is one int64 scalar and the gathered tiles carry int32 offsets: half the registers of
# int64 tiles.


@triton.jit
def tubelet_fwd_kernel(
    video,
    weight,
    bias,
    pos,
    out,
    P,
    D,
    K,
    nh,
    nw,
    t: tl.constexpr,
    h: tl.constexpr,
    w: tl.constexpr,
    stride_vb,
    stride_vc,
    stride_vt,
    stride_vh,
    stride_vw,
    stride_wd,
    stride_wk,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[b, p, d] = sum_k video[b, A(p, k)] * weight[d, k] + bias[d] + pos[p, d]; out is (B, P, D)."""
    blocks = tl.cdiv(P, BLOCK_M)
    pid_m = tl.program_id(0) % blocks
    b = (tl.program_id(0) // blocks).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < P
    mask_n = offs_n < D
    clip = video + b * stride_vb
    rows = _token_offsets(tl.where(mask_m, offs_m, 0), nh, nw, t, h, w, stride_vt, stride_vh, stride_vw)
    # int32 offset tiles and a scalar pointer that advances: fewer registers than 64-bit pointer tiles
    w_offs = offs_n[None, :] * stride_wd + offs_k[:, None] * stride_wk
    w_k = weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        cols = _tube_offsets(k0 + offs_k, t, h, w, stride_vc, stride_vt, stride_vh, stride_vw)
        a = tl.load(clip + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_k + w_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision="tf32x3")
        w_k += BLOCK_K * stride_wk
    # Epilogue in fp32, one rounding: bias, then the positional embedding (shared by the batch).
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tile = offs_m[:, None] * D + offs_n[None, :]
    if HAS_POS:
        acc += tl.load(pos + tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + b * P * D + tile, cast_rounded(acc, out.dtype.element_ty, UPCAST), mask=mask)


@triton.jit
def tubelet_bwd_video_kernel(
    grad,
    weight,
    dvideo,
    P,
    D,
    K,
    nh,
    nw,
    t: tl.constexpr,
    h: tl.constexpr,
    w: tl.constexpr,
    stride_vb,
    stride_vc,
    stride_vt,
    stride_vh,
    stride_vw,
    stride_wd,
    stride_wk,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dvideo[b, A(p, k)] = sum_d grad[b, p, d] * weight[d, k]; grad is (B, P, D) contiguous.
    Tubes do not overlap, so each element is written by exactly one program."""
    blocks = tl.cdiv(P, BLOCK_M)
    pid_m = tl.program_id(0) % blocks
    b = (tl.program_id(0) // blocks).to(tl.int64)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < P
    mask_k = offs_k < K
    dy_offs = offs_m[:, None] * D + offs_d[None, :]
    w_offs = offs_d[:, None] * stride_wd + offs_k[None, :] * stride_wk
    dy_d = grad + b * P * D
    w_d = weight
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = d0 + offs_d < D
        dy = tl.load(dy_d + dy_offs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        wt = tl.load(w_d + w_offs, mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(dy, wt, acc, input_precision="tf32x3")
        dy_d += BLOCK_D
        w_d += BLOCK_D * stride_wd
    rows = _token_offsets(tl.where(mask_m, offs_m, 0), nh, nw, t, h, w, stride_vt, stride_vh, stride_vw)
    cols = _tube_offsets(offs_k, t, h, w, stride_vc, stride_vt, stride_vh, stride_vw)
    tl.store(
        dvideo + b * stride_vb + rows[:, None] + cols[None, :],
        cast_rounded(acc, dvideo.dtype.element_ty, UPCAST),
        mask=mask_m[:, None] & mask_k[None, :],
    )


@triton.jit
def tubelet_bwd_weight_kernel(
    grad,
    video,
    dweight,
    dbias,
    B,
    P,
    D,
    K,
    nh,
    nw,
    t: tl.constexpr,
    h: tl.constexpr,
    w: tl.constexpr,
    stride_vb,
    stride_vc,
    stride_vt,
    stride_vh,
    stride_vw,
    SPLIT,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dweight[d, k] = sum_{b, p} grad[b, p, d] * video[b, A(p, k)] (A gathered again, never
    stored); dbias[d] = sum_{b, p} grad[b, p, d], accumulated by the programs of the first K block.

    The reduction runs over B * cdiv(P, BLOCK_M) token tiles (each inside one clip), cut into
    SPLIT contiguous chunks, one per program along grid axis 2. With PARTIAL (SPLIT > 1) each
    program stores its fp32 sum to dweight[split] (SPLIT, D, K) and dbias[split] (SPLIT, D), which
    the launcher adds up in a fixed order; otherwise (SPLIT = 1) it stores the result, rounded
    once, to dweight (D, K) and dbias (D,). grad is (B, P, D) contiguous."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_d = offs_d < D
    mask_k = offs_k < K
    cols = _tube_offsets(offs_k, t, h, w, stride_vc, stride_vt, stride_vh, stride_vw)
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    blocks = tl.cdiv(P, BLOCK_M)
    tiles = B * blocks
    chunk = tl.cdiv(tiles, SPLIT)  # mutant: tri-tube-split
    first = pid_s * chunk
    # The last chunks may be short or empty: an empty one stores zeros.
    for tile in range(first, tl.minimum(first + chunk, tiles)):
        b = (tile // blocks).to(tl.int64)  # int64: the batch offset can exceed 2^31
        p0 = (tile % blocks) * BLOCK_M
        mask_m = p0 + offs_m < P
        # grad loaded transposed, (BLOCK_D, BLOCK_M), as the left operand of dY^T A.
        dyt = tl.load(
            grad + b * P * D + (p0 + offs_m[None, :]) * D + offs_d[:, None],
            mask=mask_d[:, None] & mask_m[None, :],
            other=0.0,
        )
        rows = _token_offsets(tl.where(mask_m, p0 + offs_m, 0), nh, nw, t, h, w, stride_vt, stride_vh, stride_vw)
        a = tl.load(
            video + b * stride_vb + rows[:, None] + cols[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        if HAS_BIAS:
            bias_acc += tl.sum(dyt.to(tl.float32), axis=1)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(dyt, a, acc, input_precision="tf32x3")
    tile_dk = offs_d[:, None] * K + offs_k[None, :]
    mask_dk = mask_d[:, None] & mask_k[None, :]
    mask_bias = mask_d & (pid_k == 0)
    if PARTIAL:
        split = pid_s.to(tl.int64)
        tl.store(dweight + split * D * K + tile_dk, acc, mask=mask_dk)
        if HAS_BIAS:
            tl.store(dbias + split * D + offs_d, bias_acc, mask=mask_bias)
    else:
        tl.store(dweight + tile_dk, cast_rounded(acc, dweight.dtype.element_ty, UPCAST), mask=mask_dk)
        if HAS_BIAS:
            tl.store(dbias + offs_d, cast_rounded(bias_acc, dbias.dtype.element_ty, UPCAST), mask=mask_bias)


@triton.jit
def tubelet_bwd_pos_kernel(grad, dpos, B, P, D, UPCAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpos[p, d] = sum_b grad[b, p, d]: the positional embedding is shared by the batch."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (offs_p[:, None] < P) & (offs_d[None, :] < D)
    offsets = offs_p[:, None] * D + offs_d[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    ptrs = grad + offsets
    for _ in range(0, B):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += P * D  # pointer arithmetic is 64-bit: no overflow across a large batch
    tl.store(dpos + offsets, cast_rounded(acc, dpos.dtype.element_ty, UPCAST), mask=mask)


# ----------------------------------------------------------------------------------------------
# Autotune configs, listed next to the kernels they tune. GPU candidates are sized for
# sm_80/sm_90 and checked not to spill (`python -m vivit_kernels.triton.inspect --kernels tubelet`);
# under the interpreter one small config keeps the programs x iterations count low.


def _configs(block_names: str, rows: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    """Configs from (block sizes..., num_warps, num_stages) rows."""
    names = block_names.split(",")
    return [triton.Config(dict(zip(names, row[:3])), num_warps=row[3], num_stages=row[4]) for row in rows]


# fp32 dots are three tf32 tensor-core products each (tf32x3: fp32-level accuracy, unlike plain
# tf32), whose split operands need more registers: fp32 gets BLOCK_K = 16 where fp16/bf16 take 32+.
# Each candidate compiles without spills for sm_80 and sm_90 as a launch specialises it (16-byte
# aligned pointers, sizes and strides divisible by 16, which turns the gathers into 128-bit
# loads): configs that spilled were dropped.
_FWD = "BLOCK_M,BLOCK_N,BLOCK_K"
_BWD_VIDEO = "BLOCK_M,BLOCK_K,BLOCK_D"
_BWD_WEIGHT = "BLOCK_D,BLOCK_K,BLOCK_M"
_GPU_CONFIGS = {
    "fwd": {
        "16": _configs(
            _FWD,
            [(128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 64, 32, 4, 3)],
        ),
        "32": _configs(_FWD, [(64, 128, 16, 8, 3), (64, 64, 16, 8, 3), (64, 64, 16, 4, 3)]),
    },
    "bwd_video": {
        "16": _configs(_BWD_VIDEO, [(128, 64, 32, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 3)]),
        "32": _configs(_BWD_VIDEO, [(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 16, 4, 3)]),
    },
    "bwd_weight": {
        "16": _configs(_BWD_WEIGHT, [(128, 128, 32, 8, 3), (64, 64, 32, 8, 3)]),
        "32": _configs(_BWD_WEIGHT, [(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 16, 4, 3)]),
    },
}
_INTERPRETER_CONFIGS = {
    "fwd": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}),
    "bwd_video": triton.Config({"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_D": 16}),
    "bwd_weight": triton.Config({"BLOCK_D": 16, "BLOCK_K": 32, "BLOCK_M": 16}),
}
_POS_CONFIG = {"BLOCK_P": 32, "BLOCK_D": 64}
_KERNELS = {"fwd": tubelet_fwd_kernel, "bwd_video": tubelet_bwd_video_kernel, "bwd_weight": tubelet_bwd_weight_kernel}
# One autotuner per kernel and precision family, tuned per problem size (and, for d(weight), split).
_KEYS = {"fwd": ["P", "D", "K"], "bwd_video": ["P", "D", "K"], "bwd_weight": ["P", "D", "K", "SPLIT"]}
_TUNED = {
    (kernel, bits): triton.autotune(
        autotune_configs(_GPU_CONFIGS[kernel][bits], _INTERPRETER_CONFIGS[kernel]), key=_KEYS[kernel]
    )(fn)
    for kernel, fn in _KERNELS.items()
    for bits in ("16", "32")
}


def _tuned(kernel: str, dtype: torch.dtype):
    return _TUNED[kernel, "32" if dtype == torch.float32 else "16"]


# ----------------------------------------------------------------------------------------------
# Launchers, with the contract of `vivit_kernels.ops.tubelet`; `out`-style arguments let tests
# hand in NaN-poisoned buffers.


def _sizes(video: torch.Tensor, weight_shape) -> tuple[TubeletShape, int, int, int]:
    """The call's shape, and (tokens per clip P, D, K)."""
    shape = TubeletShape.of(video.shape, weight_shape)
    return shape, shape.tokens_per_clip, shape.dim, shape.tube_size


# d(weight)'s grid is (D / BLOCK_D, K / BLOCK_K, SPLIT). The D x K tiles alone are 72 programs
# at ViViT-B with 128 x 128 tiles, under one wave of an A100 (108 SMs) or H100 (132), each
# reducing every token. SPLIT cuts that reduction so that the config with the fewest programs
# still makes WAVES waves of SMS programs (one program of the large tiles fits on an SM at a
# time), while every chunk keeps at least MIN_SPLIT_TOKENS tokens, so a program's fp32 partial
# (BLOCK_D x BLOCK_K) stays small against the tiles it reads. SMS is fixed, not read from the
# device, so the result does not depend on the GPU it runs on.
SMS = 132
WAVES = 4
MIN_SPLIT_TOKENS = 1024


def weight_split(batch: int, tokens_per_clip: int, dim: int, tube_size: int, dtype: torch.dtype) -> int:
    """SPLIT = min(cdiv(WAVES * SMS, fewest D x K tiles of a config), tokens // MIN_SPLIT_TOKENS),
    at least 1: small problems run one pass and write no partials."""
    configs = _GPU_CONFIGS["bwd_weight"]["32" if dtype == torch.float32 else "16"]
    tiles = min(triton.cdiv(dim, c.kwargs["BLOCK_D"]) * triton.cdiv(tube_size, c.kwargs["BLOCK_K"]) for c in configs)
    return max(1, min(triton.cdiv(WAVES * SMS, tiles), batch * tokens_per_clip // MIN_SPLIT_TOKENS))


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Buffers the kernels write (tests replace this with a NaN-filled allocation)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """weight (D, C, t, h, w) as (D, K); a view for nn.Conv3d's contiguous weight."""
    return weight.reshape(weight.shape[0], -1)


@on_input_device
def forward(
    video: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """video (B, C, T, H, W) any strides, weight (D, C, t, h, w), pos_embed (P, D) -> tokens (B, nt, nh * nw, D).

    `out`, if given, is the contiguous (B, nt, nh * nw, D) buffer to write.
    """
    shape, P, D, K = _sizes(video, weight.shape)
    B, (_, nh, nw), (t, h, w) = shape.batch, shape.grid, shape.tubelet
    if out is None:
        out = _alloc(shape.output_shape, video.dtype, video.device)
    wmat = _weight_matrix(weight)
    pos = pos_embed.contiguous() if pos_embed is not None else None
    bias_arg = bias.contiguous() if bias is not None else wmat  # any pointer: unused when HAS_BIAS is off
    pos_arg = pos if pos is not None else wmat

    def grid(meta):
        return B * triton.cdiv(P, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])

    _tuned("fwd", video.dtype)[grid](
        video,
        wmat,
        bias_arg,
        pos_arg,
        out,
        P,
        D,
        K,
        nh,
        nw,
        t,
        h,
        w,
        *video.stride(),
        *wmat.stride(),
        HAS_BIAS=bias is not None,
        HAS_POS=pos is not None,
        UPCAST=upcast_dot_operands(video.dtype),
    )
    return out


@on_input_device
def backward_video(
    grad: torch.Tensor, video: torch.Tensor, weight: torch.Tensor, dvideo: torch.Tensor | None = None
) -> torch.Tensor:
    """d(video): grad (B, nt, S', D) -> like `video` (same strides when it is dense), with zeros
    where the floor semantics dropped frames, rows or columns."""
    shape, P, D, K = _sizes(video, weight.shape)
    B, (nt, nh, nw), (t, h, w) = shape.batch, shape.grid, shape.tubelet
    if dvideo is None:
        dvideo = torch.empty_like(video)
    _, _, T, H, W = video.shape
    # Only the remainders outside the whole tubelets: the kernel writes every covered element.
    if T > nt * t:
        dvideo[:, :, nt * t :].zero_()
    if H > nh * h:
        dvideo[:, :, : nt * t, nh * h :].zero_()
    if W > nw * w:
        dvideo[:, :, : nt * t, : nh * h, nw * w :].zero_()
    grad = grad.contiguous()
    wmat = _weight_matrix(weight)

    def grid(meta):
        return B * triton.cdiv(P, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])

    _tuned("bwd_video", video.dtype)[grid](
        grad,
        wmat,
        dvideo,
        P,
        D,
        K,
        nh,
        nw,
        t,
        h,
        w,
        *dvideo.stride(),
        *wmat.stride(),
        UPCAST=upcast_dot_operands(video.dtype),
    )
    return dvideo


@on_input_device
def backward_weight(
    grad: torch.Tensor,
    video: torch.Tensor,
    weight: torch.Tensor,
    bias_grad: bool,
    dweight: torch.Tensor | None = None,
    dbias: torch.Tensor | None = None,
    split: int | None = None,
) -> list[torch.Tensor]:
    """[d(weight)] (D, C, t, h, w) contiguous, or [d(weight), d(bias) (D,)] with `bias_grad`.

    `split` overrides `weight_split` (tests use it to split small problems)."""
    shape, P, D, K = _sizes(video, weight.shape)
    B, (_, nh, nw), (t, h, w) = shape.batch, shape.grid, shape.tubelet
    split = weight_split(B, P, D, K, video.dtype) if split is None else split
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"backward_weight: split must be a positive int, got {split!r}")
    if dweight is None:
        dweight = _alloc(weight.shape, video.dtype, video.device)
    if bias_grad and dbias is None:
        dbias = _alloc((D,), video.dtype, video.device)
    grad = grad.contiguous()
    partial = split > 1
    # fp32 partial sums per chunk of tokens, or the outputs themselves when there is one chunk.
    dweight_out = _alloc((split, D, K), torch.float32, video.device) if partial else dweight
    dbias_out = (_alloc((split, D), torch.float32, video.device) if partial else dbias) if bias_grad else dweight_out

    def grid(meta):
        return triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(K, meta["BLOCK_K"]), split

    _tuned("bwd_weight", video.dtype)[grid](
        grad,
        video,
        dweight_out,
        dbias_out,
        B,
        P,
        D,
        K,
        nh,
        nw,
        t,
        h,
        w,
        *video.stride(),
        split,
        HAS_BIAS=bias_grad,
        PARTIAL=partial,
        UPCAST=upcast_dot_operands(video.dtype),
    )
    if partial:  # a fixed-order fp32 sum over the chunks, then one rounding: deterministic, no atomics
        dweight.view(D, K).copy_(dweight_out.sum(0))
        if bias_grad:
            dbias.copy_(dbias_out.sum(0))
    return [dweight, dbias] if bias_grad else [dweight]


@on_input_device
def backward_pos(grad: torch.Tensor, dpos: torch.Tensor | None = None) -> torch.Tensor:
    """d(pos_embed): grad (B, nt, S', D) summed over the batch -> (nt * S', D)."""
    grad = grad.contiguous()
    B, nt, S, D = grad.shape
    if dpos is None:
        dpos = _alloc((nt * S, D), grad.dtype, grad.device)
    grid = (triton.cdiv(nt * S, _POS_CONFIG["BLOCK_P"]), triton.cdiv(D, _POS_CONFIG["BLOCK_D"]))
    tubelet_bwd_pos_kernel[grid](grad, dpos, B, nt * S, D, UPCAST=upcast_dot_operands(grad.dtype), **_POS_CONFIG)
    return dpos
