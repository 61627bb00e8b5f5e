"""The attention family: factorised attention between a layer's qkv and output projections, every
registry backend against the plain einsum and SDPA code a user would write instead."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

import vivit_kernels
from vivit_kernels.checks import AttentionShape, default_scale

from .core import (
    BACKWARD,
    BASELINE,
    CPU_MAX_FORWARD_FLOPS,
    CPU_MAX_SCORE_BYTES,
    FORWARD,
    PLAIN_EINSUM,
    PLAIN_SDPA,
    Case,
    parse_target,
    registry_skip_reason,
    synchronised,
)

# ViViT-B attention: 12 heads of 64, 14 x 14 = 196 patches per frame; T = 16 token frames.
# The long clip (T = 64) is where joint attention's N x N matrix dominates: a GPU case (None =
# not run on that device; the reason is in SHAPE_SKIPS). The frames_* shapes sweep T at the same
# heads and frame size (benchmarks/plots.py draws time against T per mode).
ATTENTION_SHAPES = {
    "vivit_b": {"cpu": dict(B=1, T=16, S=196, H=12, Dh=64), "cuda": dict(B=8, T=16, S=196, H=12, Dh=64)},
    "long_clip": {"cpu": None, "cuda": dict(B=1, T=64, S=196, H=12, Dh=64)},
    "frames_4": {"cpu": dict(B=1, T=4, S=196, H=12, Dh=64), "cuda": dict(B=8, T=4, S=196, H=12, Dh=64)},
    "frames_8": {"cpu": dict(B=1, T=8, S=196, H=12, Dh=64), "cuda": dict(B=8, T=8, S=196, H=12, Dh=64)},
    "frames_32": {"cpu": None, "cuda": dict(B=8, T=32, S=196, H=12, Dh=64)},
}
SHAPE_SKIPS = {
    ("long_clip", "cpu"): (
        "the long clip (T=64, N=12544) is a GPU case: on 2 CPU cores joint attention takes 483 GFLOP per "
        "forward and 7 GiB per einsum score matrix, and the factorised modes scale the T=16 rows linearly"
    ),
    ("frames_32", "cpu"): (
        "the CPU frame sweep stops at T=16 (vivit_b): joint attention at T=32 is past the CPU FLOP limit "
        "and the factorised modes scale linearly in T"
    ),
}
# With --benchmark-disable every body runs once, on shapes small enough for `make test`.
ATTENTION_SMOKE = dict(B=1, T=4, S=12, H=2, Dh=64)


# Each mode's groups as contiguous (groups, heads, L, Dh) batches, and back to (B, N, H * Dh).
PLAIN_GROUPS = {
    "joint": ("b n (h d) -> b h n d", "b h n d -> b n (h d)"),
    "spatial": ("b (t s) (h d) -> (b t) h s d", "(b t) h s d -> b (t s) (h d)"),
    "temporal": ("b (t s) (h d) -> (b s) h t d", "(b s) h t d -> b (t s) (h d)"),
}


def _einsum_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # In float32 at least, as torch's SDPA kernels accumulate: fp16 logits overflow.
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("ghid,ghjd->ghij", q.to(compute), k.to(compute)) * default_scale(q.shape[-1])
    return torch.einsum("ghij,ghjd->ghid", scores.softmax(dim=-1), v.to(compute)).to(q.dtype)


def _grouped(attend: Callable, contiguous: bool, q, k, v, heads: int, frames: int, mode: str) -> torch.Tensor:
    into, back = PLAIN_GROUPS[mode]
    frames_axis = {} if mode == "joint" else {"t": frames}
    groups = [rearrange(x, into, h=heads, **frames_axis) for x in (q, k, v)]
    if contiguous:
        groups = [x.contiguous() for x in groups]
    return rearrange(attend(*groups), back, b=q.shape[0], **frames_axis)


def plain_attention(qkv: torch.Tensor, heads: int, frames: int, mode: str, sdpa: bool = False) -> torch.Tensor:
    """The plainest competent attention of a packed qkv (B, N, 3 * H * Dh) -> (B, N, H * Dh): q, k, v
    split off, each mode's groups gathered by einops (temporal `(b s) h t d`, spatial `(b t) h s d`,
    joint all tokens; split: the first half of the heads spatial, the second temporal), then
    einsum, softmax, einsum on contiguous groups, or `sdpa`: F.scaled_dot_product_attention on
    the permuted groups. No prefix tokens, time-major grid, the default scale."""
    attend, contiguous = (F.scaled_dot_product_attention, False) if sdpa else (_einsum_attend, True)
    q, k, v = qkv.chunk(3, dim=-1)
    if mode != "split":
        return _grouped(attend, contiguous, q, k, v, heads, frames, mode)
    half = heads // 2
    width = half * q.shape[-1] // heads
    spatial = _grouped(attend, contiguous, *(x[..., :width] for x in (q, k, v)), half, frames, "spatial")
    temporal = _grouped(attend, contiguous, *(x[..., width:] for x in (q, k, v)), heads - half, frames, "temporal")
    return torch.cat([spatial, temporal], dim=-1)


PLAIN_ATTENTION = {
    PLAIN_EINSUM: plain_attention,
    PLAIN_SDPA: lambda qkv, heads, frames, mode: plain_attention(qkv, heads, frames, mode, sdpa=True),
}


def attention_fn(backend: str) -> Callable[..., torch.Tensor]:
    """(qkv (B, N, 3 * H * Dh), heads, frames, mode) -> (B, N, H * Dh): a plain baseline
    (PLAIN_ATTENTION) or a registry backend, as FactorisedAttention runs it, between a layer's qkv
    and output projections. The fused backends read q, k, v in place and write the projection's
    gradient as one buffer; the library's "reference" and "sdpa" take q, k, v views and return
    (B, H, N, Dh), which a layer then transposes and copies for its output projection."""
    if backend in PLAIN_ATTENTION:
        return PLAIN_ATTENTION[backend]
    return lambda qkv, heads, frames, mode: vivit_kernels.factorised_attention_packed(
        qkv, heads, frames, mode, backend=backend
    )


def attention_shape(mode: str, shape: dict) -> AttentionShape:
    B, T, S, H, Dh = (shape[k] for k in ("B", "T", "S", "H", "Dh"))
    return AttentionShape.of((B, H, T * S, Dh), T, mode)


ATTENTION_FLOP_FORMULA = "forward 4*B*H*N*L*Dh (L = group length); backward 2.5x forward"


def attention_flops(mode: str, shape: dict, pass_name: str) -> float:
    """The ops' formula: forward 4 * B * N * Dh * (L summed over heads); backward 2.5x forward."""
    call = attention_shape(mode, shape)
    return call.forward_flops + (call.backward_flops if pass_name == BACKWARD else 0)


ATTENTION_IO_FORMULA = (
    "forward 4*B*N*H*Dh elements (reads q, k, v, writes the output); forward+backward 12*B*N*H*Dh (the "
    "backward also reads q, k, v, the output and its gradient and writes the qkv gradient): each once, "
    "a fused kernel's compulsory traffic"
)


def attention_io_bytes(shape: dict, pass_name: str, element_size: int) -> int:
    """ATTENTION_IO_FORMULA in bytes, for elements of `element_size` bytes."""
    B, T, S, H, Dh = (shape[k] for k in ("B", "T", "S", "H", "Dh"))
    return (12 if pass_name == BACKWARD else 4) * B * T * S * H * Dh * element_size


def attention_score_bytes(mode: str, shape: dict, dtype: torch.dtype) -> int:
    """Bytes of one full score (or probability) tensor of the naive einsum path: every (query, key) pair."""
    call = attention_shape(mode, shape)
    return call.batch * call.scores * torch.finfo(dtype).bits // 8


def attention_skip_reason(spec: dict) -> str | None:
    """Why this attention case cannot run here (registry objection, interpreter, CPU budget), or None."""
    device, dtype = parse_target(spec["target"])
    backend, mode, shape = spec["backend"], spec["mode"], spec["shape"]
    if backend not in PLAIN_ATTENTION:
        reason = registry_skip_reason("attention_packed", backend, device, dtype, attention_shape(mode, shape))
        if reason:
            return reason
    keeps_scores = backend in (BASELINE, PLAIN_EINSUM)
    if device.type == "cpu":
        flops = attention_flops(mode, shape, FORWARD)
        if flops > CPU_MAX_FORWARD_FLOPS:
            return (
                f"{flops / 1e9:.0f} GFLOP per forward is too large for the CPU run "
                f"(limit {CPU_MAX_FORWARD_FLOPS / 1e9:.0f} GFLOP, ~150 GFLOP/s on 2 cores); run it on a GPU"
            )
        score = attention_score_bytes(mode, shape, dtype)
        if keeps_scores and score > CPU_MAX_SCORE_BYTES:
            return f"the einsum path's {score / 2**30:.1f} GiB score matrices do not fit the CPU run"
    if device.type == "cuda" and keeps_scores:
        # Forward+backward of the einsum path holds about four score-sized tensors at once.
        need = 4 * attention_score_bytes(mode, shape, dtype)
        total = torch.cuda.get_device_properties(device).total_memory
        if need > 0.8 * total:
            return (
                f"the einsum path needs ~{need / 2**30:.0f} GiB of score matrices; this GPU has {total / 2**30:.0f} GiB"
            )
    return None


def attention_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    shape, mode, pass_name = spec["shape"], spec["mode"], spec["pass"]
    B, T, S, H, Dh = (shape[k] for k in ("B", "T", "S", "H", "Dh"))
    N = T * S
    fn = attention_fn(spec["backend"])
    g = torch.Generator().manual_seed(0)
    # The (B, N, 3 * H * Dh) output of a layer's qkv projection.
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).to(device, dtype)
    # The gradient arrives as the output projection's backward gives it: dense (B, N, H * Dh).
    grad = torch.randn(B, N, H * Dh, generator=g).to(device, dtype)
    backward = pass_name == BACKWARD
    qkv.requires_grad_(backward)

    def run() -> None:
        if backward:
            fn(qkv, H, T, mode).backward(grad)
        else:
            with torch.no_grad():
                fn(qkv, H, T, mode)

    def setup() -> None:
        qkv.grad = None

    def saved() -> int:
        return vivit_kernels.saved_bytes(fn, qkv.detach().requires_grad_(), H, T, mode)

    return Case(
        setup=synchronised(setup, device),
        run=synchronised(run, device),
        saved_bytes=saved,
        flops=attention_flops(mode, shape, pass_name),
        flop_formula=ATTENTION_FLOP_FORMULA,
        device=device,
    )
