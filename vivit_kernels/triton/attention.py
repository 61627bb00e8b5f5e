"""Fused factorised attention in Triton: one flash-attention kernel family for every mode.

A head's N = P + T * S tokens (P prefix tokens, then a grid of T frames of S tokens) split into
G attention groups, as an `IndexMap` (vivit_kernels/index_map.py) says: member i of group g is
token BASE + g * GROUP_STRIDE + i * MEMBER_STRIDE, and a group of a spatial head also holds the
P prefix tokens (X = P "extra" members, tokens 0 .. P - 1, first). The kernels take a map's
fields as scalars, in its order: G, L, GS, MS, BASE, X = groups, length, group_stride,
member_stride, base, prefix.

    mode      G   L   GROUP_STRIDE  MEMBER_STRIDE  BASE  X     (time-major; space-major swaps the strides' roles)
    joint     1   N   0             1              0     0
    spatial   T   S   S             1              P     P     (the prefix and the S tokens of frame g)
    temporal  S   T   1             S              P     0     (the T frames of spatial position g)

A spatial group's prefix queries write their output and log-sum-exp per frame (the launcher
averages the outputs: TimeSformer's class token), and in backward their gradient rows per frame
(the launcher sums them), so no program writes another's rows. A temporal head's prefix tokens
attend among themselves: a second, small launch with `IndexMap.prefix_group`.

"split" runs heads [0, H/2) with the spatial map and [H/2, H) with the temporal map in the same
launch. Every kernel walks the tokens of a head in group-major order ("rows": row r is member
r % RL of group r // RL, RL = X + L). When groups are shorter than the block, BLOCK // RL whole
groups (`groups_per_pack`) share one block (a "pack") and a block-diagonal mask keeps them apart,
so short temporal groups still fill the tensor-core tiles; when groups are longer, a group spans
several blocks and a pack is one group. The grid is flat: (programs of every head, B), programs of the first-map
heads first, so no program exits early whatever the mode (see NOTES.md).

Forward: online softmax in base 2 (the scale carries log2(e) so exp2 is used), saves the
natural-log log-sum-exp in float32. Backward (FlashAttention-2): delta = rowsum(dO * O), then a
dK/dV kernel that loops over the queries of its pack and a dQ kernel that loops over the keys:
every gradient element is written by one program, so no atomics and the result is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..checks import AttentionShape
from ..index_map import IndexMap
from ..ops.attention import prefix_shapes, split_heads, unpack_qkv
from . import interpreted, limits
from .common import autotune_configs, cast_rounded, on_input_device, target_arch, upcast_dot_operands

LOG2E = 1.4426950408889634
LOG2E_CONST = tl.constexpr(LOG2E)


# ---------------------------------------------------------------------------------------------
# The index map, shared by every kernel of the family.


@triton.jit
def _programs_per_head(G, RL, BLOCK: tl.constexpr):
    """Programs covering one head's G groups of RL rows with blocks of BLOCK rows."""
    groups_per_pack = tl.maximum(BLOCK // RL, 1)
    blocks_per_pack = tl.cdiv(tl.minimum(groups_per_pack, G) * RL, BLOCK)
    return tl.cdiv(G, groups_per_pack) * blocks_per_pack


@triton.jit
def _locate(pid, H_A, G_A, L_A, GS_A, MS_A, BASE_A, X_A, G_B, L_B, GS_B, MS_B, BASE_B, X_B, BLOCK: tl.constexpr):
    """Program id -> (head, its map's row length, strides, base and extra members, first group of
    the pack, rows in the pack, first row of the block)."""
    progs_a = _programs_per_head(G_A, L_A + X_A, BLOCK)
    progs_b = _programs_per_head(G_B, L_B + X_B, BLOCK)
    in_a = pid < H_A * progs_a
    rest = pid - H_A * progs_a
    head = tl.where(in_a, pid // progs_a, H_A + rest // progs_b)
    local = tl.where(in_a, pid % progs_a, rest % progs_b)
    G = tl.where(in_a, G_A, G_B)
    X = tl.where(in_a, X_A, X_B)
    RL = tl.where(in_a, L_A, L_B) + X
    GS = tl.where(in_a, GS_A, GS_B)
    MS = tl.where(in_a, MS_A, MS_B)
    BASE = tl.where(in_a, BASE_A, BASE_B)
    groups_per_pack = tl.maximum(BLOCK // RL, 1)
    blocks_per_pack = tl.cdiv(tl.minimum(groups_per_pack, G) * RL, BLOCK)
    pack = local // blocks_per_pack
    group0 = pack * groups_per_pack
    pack_len = tl.minimum(groups_per_pack, G - group0) * RL  # mutant: tri-pack-len
    row0 = (local % blocks_per_pack) * BLOCK
    return head, RL, GS, MS, BASE, X, group0, pack_len, row0


@triton.jit
def _tokens(rows, group0, RL, GS, MS, BASE, X, PREFIX: tl.constexpr):
    """Token index (int64) of each row of a pack: the group's extra (prefix) members first. PREFIX
    (compile time): may a group have extra members? Without, the kernels carry none of their cost."""
    i = rows % RL
    g = group0 + rows // RL
    if PREFIX:
        tok = tl.where(i < X, i, BASE + g * GS + (i - X) * MS)  # mutant: tri-prefix-member
    else:
        tok = BASE + g * GS + i * MS  # mutant: tri-base
    return tok.to(tl.int64)


@triton.jit
def _partial_rows(rows, b, head, group0, RL, H_A, G_A, X_A):
    """Row of each (prefix) row in the per-group partial buffers, (B, H_A, G_A, X_A)-contiguous."""
    return (((b * H_A + head) * G_A + group0 + rows // RL) * X_A + rows % RL).to(tl.int64)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # fp32 operands: three tf32 tensor-core products (fp32 accuracy, unlike plain tf32); fp16/bf16 ignore it.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="tf32x3")


# ---------------------------------------------------------------------------------------------
# Kernels. The integers that change with the clip's shape (the maps, the tuning buckets, N and the
# log-sum-exp's strides, which are N's multiples) are not specialised: a new (T, S) reuses the
# compiled kernels. The other strides are (their divisibility by 16 is what lets a launch use
# 128-bit and asynchronous loads), and the head dim is a compile-time constant (a model has one).
_SHAPE_INTS = [
    "H_A",
    "G_A",
    "L_A",
    "GS_A",
    "MS_A",
    "BASE_A",
    "X_A",
    "G_B",
    "L_B",
    "GS_B",
    "MS_B",
    "BASE_B",
    "X_B",
    "TUNE_A",
    "TUNE_B",
    "slb",
    "slh",
]

# PO/PL (forward) and PDQ/PDK/PDV/PD/PL (backward) are the per-group buffers of the
# prefix rows of map A's groups, (B, H_A, G_A, X_A[, D]) contiguous; unused (never touched)
# when X_A is 0.


@triton.jit(do_not_specialize=_SHAPE_INTS)
def _attention_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    PO,
    PL,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    son,
    sod,
    slb,
    slh,
    H_A,
    G_A,
    L_A,
    GS_A,
    MS_A,
    BASE_A,
    X_A,
    G_B,
    L_B,
    GS_B,
    MS_B,
    BASE_B,
    X_B,
    qk_scale,
    TUNE_A,
    TUNE_B,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFIX: tl.constexpr,
):
    head, RL, GS, MS, BASE, X, group0, pack_len, row0 = _locate(
        tl.program_id(0), H_A, G_A, L_A, GS_A, MS_A, BASE_A, X_A, G_B, L_B, GS_B, MS_B, BASE_B, X_B, BLOCK_M
    )
    b = tl.program_id(1).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < pack_len
    row_group = rows // RL
    q_tok = _tokens(rows, group0, RL, GS, MS, BASE, X, PREFIX)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(
        Q + b * sqb + head * sqh + q_tok[:, None] * sqn + d[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    K += b * skb + head * skh
    V += b * svb + head * svh

    # Running max starts finite so that rows with no key seen yet (padding, or a pack's other
    # groups) give exp2(-inf - m) = 0 instead of NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, pack_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < pack_len
        k_tok = _tokens(cols, group0, RL, GS, MS, BASE, X, PREFIX)
        kt = tl.load(K + k_tok[None, :] * skn + d[:, None] * skd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, UPCAST) * qk_scale
        allowed = col_ok[None, :] & (row_group[:, None] == (cols // RL)[None, :])  # mutant: tri-mask
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + k_tok[:, None] * svn + d[None, :] * svd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(cast_rounded(p, v.dtype, UPCAST), v, UPCAST)
        m_i = m_new

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows only
    out = cast_rounded(acc / l_i[:, None], O.dtype.element_ty, UPCAST)
    # Natural-log LSE of the scaled logits: (m + log2 l) is its base-2 value.
    lse = (m_i + tl.log2(l_i)) / LOG2E_CONST  # mutant: tri-lse-base
    member = row_ok
    if PREFIX:
        is_prefix = (rows % RL) < X
        member = row_ok & ~is_prefix
        prefix = row_ok & is_prefix
        part = _partial_rows(rows, b, head, group0, RL, H_A, G_A, X_A)
        tl.store(PO + part[:, None] * HEAD_DIM + d[None, :], out, mask=prefix[:, None] & d_ok[None, :])
        tl.store(PL + part, lse, mask=prefix)
    tl.store(
        O + b * sob + head * soh + q_tok[:, None] * son + d[None, :] * sod, out, mask=member[:, None] & d_ok[None, :]
    )
    tl.store(LSE + b * slb + head * slh + q_tok, lse, mask=member)


@triton.jit(do_not_specialize=["N", "slb", "slh"])
def _attention_bwd_delta(
    O,
    DO,
    DELTA,
    sob,
    soh,
    son,
    sod,
    sgb,
    sgh,
    sgn,
    sgd,
    slb,
    slh,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) per token: the softmax-backward term shared by dK/dV and dQ."""
    n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_ok = n < N
    d = tl.arange(0, BLOCK_D)
    mask = n_ok[:, None] & (d < HEAD_DIM)[None, :]
    n64 = n.to(tl.int64)
    o = tl.load(O + b * sob + head * soh + n64[:, None] * son + d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sgb + head * sgh + n64[:, None] * sgn + d[None, :] * sgd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # mutant: tri-delta
    tl.store(DELTA + b * slb + head * slh + n64, delta, mask=n_ok)


@triton.jit
def _row_statistics(
    LSE, DELTA, PL, PD, rows, q_tok, b, head, group0, RL, X, H_A, G_A, X_A, row_ok, PREFIX: tl.constexpr
):
    """Per query row: log2-sum-exp, delta, and the factor its gradient contributions carry: 1/G for a
    prefix row of a spatial group (its output is the mean of G groups' outputs), else 1."""
    if PREFIX:
        is_prefix = (rows % RL) < X
        part = _partial_rows(rows, b, head, group0, RL, H_A, G_A, X_A)
        member, prefix = row_ok & ~is_prefix, row_ok & is_prefix
        lse = tl.where(
            is_prefix, tl.load(PL + part, mask=prefix, other=0.0), tl.load(LSE + q_tok, mask=member, other=0.0)
        )
        delta = tl.where(
            is_prefix, tl.load(PD + part, mask=prefix, other=0.0), tl.load(DELTA + q_tok, mask=member, other=0.0)
        )
        share = tl.where(is_prefix, 1.0 / G_A, 1.0)  # mutant: tri-prefix-share
    else:
        lse = tl.load(LSE + q_tok, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + q_tok, mask=row_ok, other=0.0)
        share = tl.full(rows.shape, 1.0, tl.float32)
    return lse * LOG2E_CONST, delta, share


@triton.jit(do_not_specialize=_SHAPE_INTS)
def _attention_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    PL,
    PD,
    PDK,
    PDV,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sgb,
    sgh,
    sgn,
    sgd,
    slb,
    slh,
    sdkb,
    sdkh,
    sdkn,
    sdkd,
    sdvb,
    sdvh,
    sdvn,
    sdvd,
    H_A,
    G_A,
    L_A,
    GS_A,
    MS_A,
    BASE_A,
    X_A,
    G_B,
    L_B,
    GS_B,
    MS_B,
    BASE_B,
    X_B,
    qk_scale,
    scale,
    TUNE_A,
    TUNE_B,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFIX: tl.constexpr,
):
    """A block of keys; loops over the queries of its pack (the only ones that see these keys)."""
    head, RL, GS, MS, BASE, X, group0, pack_len, row0 = _locate(
        tl.program_id(0), H_A, G_A, L_A, GS_A, MS_A, BASE_A, X_A, G_B, L_B, GS_B, MS_B, BASE_B, X_B, BLOCK_N
    )
    b = tl.program_id(1).to(tl.int64)
    cols = row0 + tl.arange(0, BLOCK_N)
    col_ok = cols < pack_len
    col_group = cols // RL
    k_tok = _tokens(cols, group0, RL, GS, MS, BASE, X, PREFIX)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + head * skh + k_tok[:, None] * skn + d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + head * svh + k_tok[:, None] * svn + d[None, :] * svd, mask=kv_mask, other=0.0)
    Q += b * sqb + head * sqh
    DO += b * sgb + head * sgh
    LSE += b * slb + head * slh
    DELTA += b * slb + head * slh

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, pack_len, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < pack_len
        q_tok = _tokens(rows, group0, RL, GS, MS, BASE, X, PREFIX)
        lse2, delta, share = _row_statistics(
            LSE, DELTA, PL, PD, rows, q_tok, b, head, group0, RL, X, H_A, G_A, X_A, row_ok, PREFIX
        )
        qt = tl.load(Q + q_tok[None, :] * sqn + d[:, None] * sqd, mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(DO + q_tok[:, None] * sgn + d[None, :] * sgd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        # Transposed tiles (keys x queries): the probabilities recomputed from the saved LSE.
        st = _dot(k, qt, UPCAST) * qk_scale
        allowed = row_ok[None, :] & (col_group[:, None] == (rows // RL)[None, :])
        pt = tl.exp2(tl.where(allowed, st - lse2[None, :], float("-inf")))  # masked before exp2: no overflow
        dpt = _dot(v, tl.trans(do), UPCAST)
        dst = pt * (dpt - delta[None, :])
        if PREFIX:
            pt *= share[None, :]
            dst *= share[None, :]
        dv += _dot(cast_rounded(pt, do.dtype, UPCAST), do, UPCAST)
        dk += _dot(cast_rounded(dst, qt.dtype, UPCAST), tl.trans(qt), UPCAST)

    dk *= scale  # mutant: tri-dk-scale
    member = col_ok
    if PREFIX:
        is_prefix = (cols % RL) < X
        member = col_ok & ~is_prefix
        prefix = (col_ok & is_prefix)[:, None] & d_ok[None, :]
        part = _partial_rows(cols, b, head, group0, RL, H_A, G_A, X_A)
        tl.store(PDK + part[:, None] * HEAD_DIM + d[None, :], dk, mask=prefix)
        tl.store(PDV + part[:, None] * HEAD_DIM + d[None, :], dv, mask=prefix)
    tl.store(
        DK + b * sdkb + head * sdkh + k_tok[:, None] * sdkn + d[None, :] * sdkd,
        cast_rounded(dk, DK.dtype.element_ty, UPCAST),
        mask=member[:, None] & d_ok[None, :],
    )
    tl.store(
        DV + b * sdvb + head * sdvh + k_tok[:, None] * sdvn + d[None, :] * sdvd,
        cast_rounded(dv, DV.dtype.element_ty, UPCAST),
        mask=member[:, None] & d_ok[None, :],
    )


@triton.jit(do_not_specialize=_SHAPE_INTS)
def _attention_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    PL,
    PD,
    PDQ,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sgb,
    sgh,
    sgn,
    sgd,
    slb,
    slh,
    sdqb,
    sdqh,
    sdqn,
    sdqd,
    H_A,
    G_A,
    L_A,
    GS_A,
    MS_A,
    BASE_A,
    X_A,
    G_B,
    L_B,
    GS_B,
    MS_B,
    BASE_B,
    X_B,
    qk_scale,
    scale,
    TUNE_A,
    TUNE_B,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREFIX: tl.constexpr,
):
    """A block of queries; loops over the keys of its pack, like the forward."""
    head, RL, GS, MS, BASE, X, group0, pack_len, row0 = _locate(
        tl.program_id(0), H_A, G_A, L_A, GS_A, MS_A, BASE_A, X_A, G_B, L_B, GS_B, MS_B, BASE_B, X_B, BLOCK_M
    )
    b = tl.program_id(1).to(tl.int64)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < pack_len
    row_group = rows // RL
    q_tok = _tokens(rows, group0, RL, GS, MS, BASE, X, PREFIX)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + head * sqh + q_tok[:, None] * sqn + d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sgb + head * sgh + q_tok[:, None] * sgn + d[None, :] * sgd, mask=q_mask, other=0.0)
    lse2, delta, share = _row_statistics(
        LSE + b * slb + head * slh,
        DELTA + b * slb + head * slh,
        PL,
        PD,
        rows,
        q_tok,
        b,
        head,
        group0,
        RL,
        X,
        H_A,
        G_A,
        X_A,
        row_ok,
        PREFIX,
    )
    K += b * skb + head * skh
    V += b * svb + head * svh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, pack_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < pack_len
        k_tok = _tokens(cols, group0, RL, GS, MS, BASE, X, PREFIX)
        # K is loaded transposed (head dim x keys), as in the forward, and transposed back for
        # dS K: loading K row-major and transposing it for Q K^T costs registers that made the
        # fp32 kernel spill at head dim 128.
        kvt_mask = col_ok[None, :] & d_ok[:, None]
        kt = tl.load(K + k_tok[None, :] * skn + d[:, None] * skd, mask=kvt_mask, other=0.0)
        vt = tl.load(V + k_tok[None, :] * svn + d[:, None] * svd, mask=kvt_mask, other=0.0)
        s = _dot(q, kt, UPCAST) * qk_scale
        allowed = col_ok[None, :] & (row_group[:, None] == (cols // RL)[None, :])
        p = tl.exp2(tl.where(allowed, s - lse2[:, None], float("-inf")))
        dp = _dot(do, vt, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(cast_rounded(ds, kt.dtype, UPCAST), tl.trans(kt), UPCAST)

    dq *= scale
    member = row_ok
    if PREFIX:
        dq *= share[:, None]
        is_prefix = (rows % RL) < X
        member = row_ok & ~is_prefix
        part = _partial_rows(rows, b, head, group0, RL, H_A, G_A, X_A)
        tl.store(PDQ + part[:, None] * HEAD_DIM + d[None, :], dq, mask=(row_ok & is_prefix)[:, None] & d_ok[None, :])
    tl.store(
        DQ + b * sdqb + head * sdqh + q_tok[:, None] * sdqn + d[None, :] * sdqd,
        cast_rounded(dq, DQ.dtype.element_ty, UPCAST),
        mask=member[:, None] & d_ok[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Autotune candidates, Hopper/Ampere sizes: (primary block, loop block, warps, stages). Forward
# and dQ: primary = BLOCK_M queries, loop = BLOCK_N keys; dK/dV the other way round. Which of
# them the autotuner may run on a GPU is read from compiles of real launches for each
# architecture (limits.py: spill-free, within the architecture's shared memory), per dtype
# width, head dim and prefix variant.
_TABLES = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
    "dkdv": [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)],
    "dq": [(128, 32, 8, 2), (64, 32, 4, 2), (32, 16, 8, 2), (16, 16, 8, 1)],
}
_PRIMARY = {"fwd": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M"), "dq": ("BLOCK_M", "BLOCK_N")}


def _configs(kernel: str) -> list[triton.Config]:
    primary, loop = _PRIMARY[kernel]
    return [triton.Config({primary: p, loop: l}, num_warps=w, num_stages=s) for p, l, w, s in _TABLES[kernel]]


def config_key(kernel: str, config: triton.Config) -> str:
    """The name of a candidate in limits.py, e.g. "fwd 128x64 w8 s3"."""
    primary, loop = _PRIMARY[kernel]
    return f"{kernel} {config.kwargs[primary]}x{config.kwargs[loop]} w{config.num_warps} s{config.num_stages}"


def _fits(kernel: str, config: triton.Config, element_size: int, head_dim: int, prefix: bool, arch: int) -> bool:
    """May the autotuner run `config` of `kernel` on sm_`arch` for this dtype width, head dim and prefix variant?"""
    return limits.allows(config_key(kernel, config), element_size, head_dim, prefix, arch)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if interpreted():
            return configs
        q = named_args["Q"]
        arch = target_arch(q)
        kept = [c for c in configs if _fits(kernel, c, q.element_size(), kwargs["HEAD_DIM"], kwargs["PREFIX"], arch)]
        return kept or configs[-1:]  # the smallest tile: never pruned away entirely

    return {"early_config_prune": prune}


# Under the interpreter: one config, blocks that still leave several blocks and loop steps per
# group at test sizes (S = 50 spans a 32-key loop twice; joint N = 250 spans 4 query blocks).
_INTERPRETER_FWD = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})
_INTERPRETER_DKDV = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64})
_INTERPRETER_DQ = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32})
_DELTA_BLOCK = 32
# Tuned per bucket of group lengths (TUNE_A, TUNE_B: the next power of two of each map's row
# length), head dim and prefix variant (the dtype is added by the autotuner): a new clip length
# in the same bucket reuses the choice. Timings are cached on disk (Triton's cache directory), so
# a restarted or second run does not tune again.
_KEY = ["TUNE_A", "TUNE_B", "HEAD_DIM", "PREFIX"]


def _autotuned(kernel: str, fn, interpreter_config: triton.Config):
    return triton.autotune(
        autotune_configs(_configs(kernel), interpreter_config),
        key=_KEY,
        prune_configs_by=_pruner(kernel),
        cache_results=True,
    )(fn)


_fwd = _autotuned("fwd", _attention_fwd, _INTERPRETER_FWD)
_dkdv = _autotuned("dkdv", _attention_bwd_dkdv, _INTERPRETER_DKDV)
_dq = _autotuned("dq", _attention_bwd_dq, _INTERPRETER_DQ)


# ---------------------------------------------------------------------------------------------
# Launchers, with the contract of `vivit_kernels.ops.attention` (the op layer calls them).


class Launch(NamedTuple):
    """One launch of a call: heads [first_head, first_head + heads), the first `heads_a` of them
    with `map_a`, the rest with `map_b`."""

    first_head: int
    heads: int
    heads_a: int
    map_a: IndexMap
    map_b: IndexMap


# A map B nobody uses (no head past heads_a) only has to keep the program arithmetic finite.
_UNUSED = IndexMap(groups=1, length=1, group_stride=0, member_stride=1, base=0, prefix=0)


def index_maps(shape: AttentionShape) -> list[Launch]:
    """The launches of a call."""
    H = shape.heads
    if shape.mode == "split":
        launches = [Launch(0, H, H // 2, IndexMap.of(shape, "spatial"), IndexMap.of(shape, "temporal"))]
        temporal_heads = (H // 2, H - H // 2)
    else:
        launches = [Launch(0, H, H, IndexMap.of(shape), _UNUSED)]
        temporal_heads = (0, H) if shape.mode == "temporal" else None
    if shape.prefix and temporal_heads:  # the temporal heads' prefix tokens: one group of their own
        h0, heads = temporal_heads
        launches.append(Launch(h0, heads, heads, IndexMap.prefix_group(shape), _UNUSED))
    return launches


def _map_args(heads_a: int, map_a: IndexMap, map_b: IndexMap) -> tuple[int, ...]:
    """The kernels' H_A, G_A, L_A, GS_A, MS_A, BASE_A, X_A, G_B, L_B, GS_B, MS_B, BASE_B, X_B."""
    return (
        heads_a,
        *(x for m in (map_a, map_b) for x in (m.groups, m.length, m.group_stride, m.member_stride, m.base, m.prefix)),
    )


def _host_programs_per_head(groups: int, row_length: int, block: int) -> int:
    """`_programs_per_head` for the launch grid."""
    groups_per_pack = max(block // row_length, 1)
    blocks_per_pack = triton.cdiv(min(groups_per_pack, groups) * row_length, block)  # mutant: tri-grid
    return triton.cdiv(groups, groups_per_pack) * blocks_per_pack


def _grid(heads: int, batch: int, h_a: int, map_a: IndexMap, map_b: IndexMap, block: str):
    def grid(meta):
        bs = meta[block]
        progs_a = _host_programs_per_head(map_a.groups, map_a.row_length, bs)
        progs = h_a * progs_a + (heads - h_a) * _host_programs_per_head(map_b.groups, map_b.row_length, bs)
        return (progs, batch)

    return grid


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes (tests replace this with a NaN-filled allocation)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _buckets(map_a: IndexMap, map_b: IndexMap) -> tuple[int, int]:
    """The autotuning buckets of two maps (or tuples of their fields): the next power of two of
    each row length (>= 16)."""
    return tuple(max(16, triton.next_power_of_2(IndexMap(*m).row_length)) for m in (map_a, map_b))


def _or(x: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """x, or a stand-in when x is empty: a kernel argument no program touches must still be a real pointer."""
    return x if x.numel() else stand_in


def _heads(x: torch.Tensor, h0: int, heads: int) -> torch.Tensor:
    """Heads [h0, h0 + heads) of a (B, H, ...) tensor: a view, so a launch can cover some heads only."""
    return x.narrow(1, h0, heads)


@on_input_device
def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, prefix: int, layout: str, mode: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v: (B, H, N, Dh), any strides -> out (a (B, H, N, Dh) view of a (B, N, H, Dh) buffer),
    lse (B, H, N) fp32, and the per-frame prefix rows prefix_out (B, Ha, T, P, Dh), prefix_lse (B, Ha, T, P)."""
    shape = AttentionShape.of(q.shape, frames, mode, scale, prefix=prefix, layout=layout)
    B, H, N, Dh = q.shape
    averaged_heads, groups = shape.averaged_prefix
    out = _alloc((B, N, H, Dh), q.dtype, q.device).transpose(1, 2)
    lse = _alloc((B, H, N), torch.float32, q.device)
    out_shape, lse_shape = prefix_shapes(shape)
    prefix_out = _alloc(out_shape, q.dtype, q.device)
    prefix_lse = _alloc(lse_shape, torch.float32, q.device)
    po, pl = _or(prefix_out, out), _or(prefix_lse, lse)
    for h0, heads, h_a, map_a, map_b in index_maps(shape):
        qh, kh, vh, oh, lh = (_heads(x, h0, heads) for x in (q, k, v, out, lse))
        _fwd[_grid(heads, B, h_a, map_a, map_b, "BLOCK_M")](
            qh,
            kh,
            vh,
            oh,
            lh,
            po,
            pl,
            *qh.stride(),
            *kh.stride(),
            *vh.stride(),  # mutant: tri-v-strides
            *oh.stride(),
            lh.stride(0),
            lh.stride(1),
            *_map_args(h_a, map_a, map_b),
            scale * LOG2E,  # mutant: tri-log2e
            *_buckets(map_a, map_b),
            HEAD_DIM=Dh,
            BLOCK_D=_block_d(Dh),
            UPCAST=upcast_dot_operands(q.dtype),
            PREFIX=map_a.prefix > 0,
        )
    if averaged_heads:  # a spatial head's prefix query: the mean of its per-frame outputs
        out[:, :averaged_heads, :prefix] = prefix_out.float().mean(2).to(q.dtype)  # mutant: tri-prefix-mean
        lse[:, :averaged_heads, :prefix] = 0.0  # unused
    return out, lse, prefix_out, prefix_lse


@on_input_device
def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    frames: int,
    prefix: int,
    layout: str,
    mode: str,
    scale: float,
    into: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `forward`: dq, dk, dv as (B, H, N, Dh) views of (B, N, H, Dh) buffers, or
    written into the (B, H, N, Dh) views `into` (of one packed buffer, say)."""
    shape = AttentionShape.of(q.shape, frames, mode, scale, prefix=prefix, layout=layout)
    B, H, N, Dh = q.shape
    averaged_heads, groups = shape.averaged_prefix
    block_d = _block_d(Dh)
    upcast = upcast_dot_operands(q.dtype)
    delta = _alloc((B, H, N), torch.float32, q.device)
    _attention_bwd_delta[(triton.cdiv(N, _DELTA_BLOCK), H, B)](
        out,
        dout,
        delta,
        *out.stride(),
        *dout.stride(),
        delta.stride(0),
        delta.stride(1),
        N,
        HEAD_DIM=Dh,
        BLOCK_M=_DELTA_BLOCK,
        BLOCK_D=block_d,
    )
    # The averaged prefix rows, per frame: delta against that frame's output (the 1/T share of the
    # gradient is applied in the kernels), and fp32 partial gradients, summed below.
    prefix_delta = (
        (dout[:, :averaged_heads, None, :prefix].float() * prefix_out.float()).sum(-1) if averaged_heads else prefix_lse
    )  # (B, Ha, T, P)
    dq, dk, dv = into or (_alloc((B, N, H, Dh), q.dtype, q.device).transpose(1, 2) for _ in range(3))
    pdq, pdk, pdv = (_alloc(prefix_out.shape, torch.float32, q.device) for _ in range(3))
    pl, pd, pdq_, pdk_, pdv_ = (_or(x, delta) for x in (prefix_lse, prefix_delta, pdq, pdk, pdv))
    for h0, heads, h_a, map_a, map_b in index_maps(shape):
        qh, kh, vh, gh, lh, deltah = (_heads(x, h0, heads) for x in (q, k, v, dout, lse, delta))
        # mutant: tri-dout-strides
        common = (*qh.stride(), *kh.stride(), *vh.stride(), *gh.stride(), lh.stride(0), lh.stride(1))
        maps = (*_map_args(h_a, map_a, map_b), scale * LOG2E, scale, *_buckets(map_a, map_b))
        dqh, dkh, dvh = (_heads(x, h0, heads) for x in (dq, dk, dv))
        _dkdv[_grid(heads, B, h_a, map_a, map_b, "BLOCK_N")](
            qh,
            kh,
            vh,
            gh,
            lh,
            deltah,
            dkh,
            dvh,
            pl,
            pd,
            pdk_,
            pdv_,
            *common,
            *dkh.stride(),
            *dvh.stride(),
            *maps,
            HEAD_DIM=Dh,
            BLOCK_D=block_d,
            UPCAST=upcast,
            PREFIX=map_a.prefix > 0,
        )
        _dq[_grid(heads, B, h_a, map_a, map_b, "BLOCK_M")](
            qh,
            kh,
            vh,
            gh,
            lh,
            deltah,
            dqh,
            pl,
            pd,
            pdq_,
            *common,
            *dqh.stride(),
            *maps,
            HEAD_DIM=Dh,
            BLOCK_D=block_d,
            UPCAST=upcast,
            PREFIX=map_a.prefix > 0,
        )
    if averaged_heads:
        for grad, partial in ((dq, pdq), (dk, pdk), (dv, pdv)):
            grad[:, :averaged_heads, :prefix] = partial.sum(2).to(q.dtype)
    return dq, dk, dv


@on_input_device
def packed_forward(
    qkv: torch.Tensor, heads: int, frames: int, prefix: int, layout: str, mode: str, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward` on a packed (B, N, 3 * H * Dh) projection; out comes back as (B, N, H * Dh)."""
    out, *statistics = forward(*unpack_qkv(qkv, heads), frames, prefix, layout, mode, scale)
    return (out.transpose(1, 2).flatten(2), *statistics)


@on_input_device
def packed_backward(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    heads: int,
    frames: int,
    prefix: int,
    layout: str,
    mode: str,
    scale: float,
) -> torch.Tensor:
    """The gradient of the packed projection, (B, N, 3 * H * Dh), written by the kernels in place."""
    dqkv = _alloc(qkv.shape, qkv.dtype, qkv.device)
    backward(
        split_heads(dout, heads),
        *unpack_qkv(qkv, heads),
        split_heads(out, heads),
        lse,
        prefix_out,
        prefix_lse,
        frames,
        prefix,
        layout,
        mode,
        scale,
        into=unpack_qkv(dqkv, heads),
    )
    return dqkv
