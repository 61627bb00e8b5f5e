"""What is benchmarked: each case is a JSON-able spec and a builder that turns it into inputs and a call.

A spec names the op, the implementation ("backend": a registry name, or one of the baselines
defined here: "plain_einsum", "plain_sdpa", "conv3d", "unfold_matmul"), the pass, the
device/dtype target and the shape. The same builder serves the timed test and the child process
that measures CPU peak memory (`python -m benchmarks.measure`), so both run exactly the same call.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

import vivit_kernels
from vivit_kernels import backends
from vivit_kernels.checks import MODES, AttentionShape, TubeletShape, default_scale

FORWARD, BACKWARD = "forward", "forward+backward"
PASSES = (FORWARD, BACKWARD)
BASELINE = "reference"  # the library's naive einsum backend: the einsum baseline of every op but attention
# Attention is measured against the plain code a user would write instead (`plain_attention`):
# the library's "reference" and "sdpa" backends carry its general paths (prefix tokens, layouts,
# dropout) and run slower than that, so they stay rows but are not what speedups divide.
PLAIN_EINSUM, PLAIN_SDPA = "plain_einsum", "plain_sdpa"
UNFUSED_ATTENTION = (BASELINE, "sdpa")  # the library's backends that are timed as rows, not as baselines


def einsum_baseline(op: str) -> str:
    """The einsum implementation an op's speedups ("vs einsum") are relative to."""
    return PLAIN_EINSUM if op == "attention" else BASELINE


# The torch implementation a user would otherwise call: speedups against it are reported too.
# For a converted model (op "dropin") it is the model as its library built it.
TORCH_BASELINES = {"attention": PLAIN_SDPA, "tubelet": "conv3d", "dropin": "original"}

# Device/dtype targets: fp32 on the CPU; fp16 and bf16 on CUDA GPUs.
TARGETS = ("cpu-float32", "cuda-float16", "cuda-bfloat16")

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

# ViViT-B tubelet embedding: a 16-frame 224 x 224 RGB clip, 2 x 16 x 16 tubelets, D = 768.
TUBELET_SHAPES = {
    "vivit_b": {
        "cpu": dict(B=1, C=3, T=16, H=224, W=224, t=2, h=16, w=16, D=768),
        "cuda": dict(B=8, C=3, T=16, H=224, W=224, t=2, h=16, w=16, D=768),
    },
}
TUBELET_SMOKE = dict(B=1, C=3, T=4, H=32, W=32, t=2, h=16, w=16, D=64)

# CPU limits of the timed run (2 cores, ~150 GFLOP/s fp32, shared memory): larger cases are
# skipped on the CPU with the reason, and run on GPUs.
CPU_MAX_FORWARD_FLOPS = 50e9
CPU_MAX_SCORE_BYTES = 2 * 2**30


def parse_target(target: str) -> tuple[torch.device, torch.dtype]:
    device, dtype = target.split("-")
    return torch.device(device), getattr(torch, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Case:
    """One benchmarked call. `setup` (untimed) resets state; `run` does one pass, synchronised on CUDA."""

    setup: Callable[[], None]
    run: Callable[[], None]
    # Bytes autograd saves for backward in this call (measured with inputs that require grad).
    saved_bytes: Callable[[], int]
    flops: float | None  # from the stated formula; None where counted while warming up
    flop_formula: str
    device: torch.device
    info: dict = field(default_factory=dict)


def _synchronised(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`fn` followed by a device synchronisation. Around a timed call (after its setup, and after
    the call itself) this makes the timer cover exactly that call's kernels."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


# ----------------------------------------------------------------------------------- attention


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


def attention_score_bytes(mode: str, shape: dict, dtype: torch.dtype) -> int:
    """Bytes of one full score (or probability) tensor of the naive einsum path: every (query, key) pair."""
    call = attention_shape(mode, shape)
    return call.batch * call.scores * torch.finfo(dtype).bits // 8


def registry_skip_reason(op: str, backend: str, device: torch.device, dtype: torch.dtype, shape) -> str | None:
    """Why a registered backend is not benchmarked on this input: it cannot run it, or "auto"
    passes it over although it runs when named (the Triton interpreter: never timed)."""
    chosen = backends.get(backend)
    request = backends.Request(op, device, dtype, shape)
    reasons = chosen.not_supported_reasons(request) or (chosen.auto_reasons(request) if chosen.auto else [])
    return f"backend {backend!r}: {', '.join(reasons)}" if reasons else None


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
            return f"the einsum path needs ~{need / 2**30:.0f} GiB of score matrices; this GPU has {total / 2**30:.0f} GiB"
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
        setup=_synchronised(setup, device),
        run=_synchronised(run, device),
        saved_bytes=saved,
        flops=attention_flops(mode, shape, pass_name),
        flop_formula=ATTENTION_FLOP_FORMULA,
        device=device,
    )


# ------------------------------------------------------------------------------------- tubelet


def conv3d_tubelet(video, weight, bias, pos_embed, tubelet):
    """nn.Conv3d's functional form with stride = kernel, as time-major tokens plus the positional embedding."""
    out = F.conv3d(video, weight, bias, stride=tubelet)  # (B, D, nt, nh, nw)
    return out.flatten(3).permute(0, 2, 3, 1) + pos_embed


def unfold_matmul_tubelet(video, weight, bias, pos_embed, tubelet):
    """Tubes cut with Tensor.unfold, gathered into one (tokens, C*t*h*w) matrix, one addmm."""
    t, h, w = tubelet
    B, D = video.shape[0], weight.shape[0]
    tubes = video.unfold(2, t, t).unfold(3, h, h).unfold(4, w, w)  # (B, C, nt, nh, nw, t, h, w)
    nt, nh, nw = tubes.shape[2:5]
    rows = tubes.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B * nt * nh * nw, -1)
    tokens = torch.addmm(bias, rows, weight.reshape(D, -1).t())
    return tokens.reshape(B, nt, nh * nw, D) + pos_embed


def tubelet_fn(backend: str) -> Callable[..., torch.Tensor]:
    """(video, weight, bias, pos_embed, tubelet) -> (B, nt, S', D)."""
    if backend == "conv3d":
        return conv3d_tubelet
    if backend == "unfold_matmul":
        return unfold_matmul_tubelet
    return lambda video, weight, bias, pos, tubelet: vivit_kernels.tubelet_embedding(
        video, weight, bias, pos, backend=backend
    )


def tubelet_shape(shape: dict) -> TubeletShape:
    video = (shape["B"], shape["C"], shape["T"], shape["H"], shape["W"])
    weight = (shape["D"], shape["C"], shape["t"], shape["h"], shape["w"])
    return TubeletShape.of(video, weight, torch.empty(video, device="meta").stride())


def tubelet_flops(shape: dict, pass_name: str) -> float:
    """The ops' formula: forward 2 * tokens * D * (C*t*h*w); backward (weight, bias and positional
    gradients) 1x forward."""
    return tubelet_shape(shape).flops * (2.0 if pass_name == BACKWARD else 1.0)


def tubelet_skip_reason(spec: dict) -> str | None:
    device, dtype = parse_target(spec["target"])
    backend = spec["backend"]
    if backend not in ("conv3d", "unfold_matmul"):
        return registry_skip_reason("tubelet", backend, device, dtype, tubelet_shape(spec["shape"]))
    return None


def tubelet_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    shape, pass_name = spec["shape"], spec["pass"]
    B, C, T, H, W, D = (shape[k] for k in ("B", "C", "T", "H", "W", "D"))
    tubelet = (shape["t"], shape["h"], shape["w"])
    nt, S = T // tubelet[0], (H // tubelet[1]) * (W // tubelet[2])
    fn = tubelet_fn(spec["backend"])
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, C, T, H, W, generator=g).to(device, dtype)  # data: never needs a gradient
    params = [
        (torch.randn(D, C, *tubelet, generator=g) * 0.02).to(device, dtype),
        torch.randn(D, generator=g).to(device, dtype),
        torch.randn(nt, S, D, generator=g).to(device, dtype),
    ]
    grad = torch.randn(B, nt, S, D, generator=g).to(device, dtype)
    backward = pass_name == BACKWARD
    for p in params:
        p.requires_grad_(backward)

    def run() -> None:
        if backward:
            fn(video, *params, tubelet).backward(grad)
        else:
            with torch.no_grad():
                fn(video, *params, tubelet)

    def setup() -> None:
        for p in params:
            p.grad = None

    def saved() -> int:
        leaves = [p.detach().requires_grad_() for p in params]
        return vivit_kernels.saved_bytes(fn, video, *leaves, tubelet)

    return Case(
        setup=_synchronised(setup, device),
        run=_synchronised(run, device),
        saved_bytes=saved,
        flops=tubelet_flops(shape, pass_name),
        flop_formula="forward 2*tokens*D*C*t*h*w; backward (weight, bias, pos_embed grads) 1x forward",
        device=device,
    )


# ------------------------------------------------------------------------------- training step

# A full ViViT-B training step (86M parameters). The CPU run uses a short, small clip
# (4 x 7 x 7 = 196 tokens) so that eight models (four variants, fused and naive) train within
# the CPU budget; GPUs take 16 frames at the paper's 224 x 224 (8 x 14 x 14 = 1568 tokens).
TRAINING_SHAPES = {
    "vivit_b": {
        "cpu": dict(B=1, num_frames=8, img_size=112),
        "cuda": dict(B=8, num_frames=16, img_size=224),
    },
}
# The smoke run shrinks the model too (overrides are ViViTConfig fields); heads stay 64 wide.
TRAINING_SMOKE = dict(B=1, num_frames=4, img_size=32, overrides=dict(dim=128, depth=2, num_heads=2, temporal_depth=1))
TRAINING_TARGETS = ("cpu-float32", "cuda-bfloat16")  # GPUs train under bf16 autocast
TRAIN_STEP = "train step"
VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")
TRAINING_BACKENDS = (BASELINE, "auto")  # naive einsum attention against whatever "auto" fuses


def training_skip_reason(spec: dict) -> str | None:
    """Why the training step cannot run (models package missing, nothing fused for "auto"), or None."""
    try:
        from vivit import create_model  # noqa: F401, PLC0415
    except ImportError as error:
        return f"the vivit models package has no create_model: {error}"
    device, dtype = parse_target(spec["target"])
    if spec["backend"] == "auto":
        # "auto" may fall back to the reference: then there is no fused step to compare.
        request = backends.Request("attention", device, dtype, AttentionShape.of((1, 2, 4 * 16, 64), 4, "split"))
        with warnings.catch_warnings(record=True) as fallback:
            warnings.simplefilter("always")
            chosen = backends.select(request, "auto").name
        if chosen == BASELINE:
            detail = str(fallback[0].message) if fallback else "no fused backend is registered"
            return f"no fused attention backend for {device.type} {dtype_name(dtype)} ({detail})"
    return None


def training_model(spec: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The case's model on the target device (seeded: the same weights for every backend), a
    batch of clips (B, 3, T, size, size) and its labels (B,)."""
    from vivit import create_model  # noqa: PLC0415

    device, _ = parse_target(spec["target"])
    shape = spec["shape"]
    B, T, size = shape["B"], shape["num_frames"], shape["img_size"]
    torch.manual_seed(0)
    model = create_model(
        "vivit_b",
        variant=spec["variant"],
        num_classes=400,
        num_frames=T,
        img_size=size,
        backend=spec["backend"],
        grad_checkpointing=False,
        **shape.get("overrides", {}),
    ).to(device)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, 3, T, size, size, generator=g).to(device)
    labels = torch.randint(0, 400, (B,), generator=g).to(device)
    return model, video, labels


def training_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    model, video, labels = training_model(spec)
    return train_step_case(model, lambda: model(video), labels, device, dtype)


def train_step_case(
    model: torch.nn.Module, logits: Callable[[], torch.Tensor], labels: torch.Tensor, device: torch.device,
    dtype: torch.dtype, optimizer: torch.optim.Optimizer | None = None,
) -> Case:
    """One training step of `model` (on `device`): cross-entropy of `logits()` against `labels`, its
    backward and an update by `optimizer` (default: a new AdamW); zero_grad runs untimed before it."""
    model.train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)
    # fp32 on the CPU; on GPUs the usual mixed precision (autocast to the target dtype).
    autocast = device.type == "cuda" and dtype != torch.float32

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return F.cross_entropy(logits(), labels)

    def run() -> None:
        loss().backward()
        optimizer.step()

    def setup() -> None:
        # Outside the timed call, so that peak memory counts the step's gradients.
        optimizer.zero_grad(set_to_none=True)

    return Case(
        setup=_synchronised(setup, device),
        run=_synchronised(run, device),
        saved_bytes=lambda: vivit_kernels.saved_bytes(loss),
        flops=None,
        flop_formula="torch.utils.flop_counter.FlopCounterMode over one step (forward+backward)",
        device=device,
        info={"parameters": sum(p.numel() for p in model.parameters())},
    )


BUILDERS = {"attention": attention_case, "tubelet": tubelet_case, "training": training_case}

from .loader import loader_case  # noqa: E402  (it builds on Case above)

BUILDERS["loader"] = loader_case

from .dropin import dropin_case  # noqa: E402  (it builds on Case above)

BUILDERS["dropin"] = dropin_case

from .memory import memory_case  # noqa: E402  (it builds on Case above)

BUILDERS["memory"] = memory_case
