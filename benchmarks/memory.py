"""The memory case: a ViViT training step per variant and implementation, what it keeps for backward,
and the largest batch whose step fits a memory budget.

Implementations are `vivit.memory_report`'s: einsum (the baseline, spec backend "reference"), the
SDPA swap, fused, fused+lean and fused with gradient checkpointing. A step is `train_step_case`'s
(cross-entropy, backward, AdamW), fp32 on the CPU and under bf16 autocast on GPUs. Before anything
is timed, `check_against_einsum` compares each implementation's logits and first-layer gradient
with the einsum model's (same weights, fp32).

The budget covers the whole step: weights, gradients, AdamW state, the batch and what the step
allocates. The model is built and its AdamW state filled (a zero-gradient update) once per variant
and implementation, then `largest_batch` measures steps at batches 1 and 2, aims at the budget
along the line through them (memory grows by about the same amount per clip) and measures around
that guess until a batch that fits sits next to one that does not. CUDA: `torch.cuda.max_memory_
allocated` of a step (after a warm-up step), in this process. CPU: in a fresh child process, the
peak resident memory (VmHWM, reset before each step) above the child's footprint before the model
was built (python, torch, the cases and the C++ kernels loaded).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import torch

from vivit.memory_report import IMPLEMENTATIONS, build, count

from .core import (
    BASELINE,
    Case,
    check_matches,
    cpu_peak_in_process,
    parse_target,
    probe_in_child,
    train_step_case,
    training_skip_reason,
)

EINSUM = "einsum"
MEMORY_TARGETS = ("cpu-float32", "cuda-bfloat16")
MEMORY_BACKENDS = tuple(BASELINE if impl == EINSUM else impl for impl in IMPLEMENTATIONS)
CLASSES = 400
# ViViT-B, as the training-step benchmark: CPU 8 frames of 112 x 112 (196 tokens); GPU 16 x 224 x 224
# (1568 tokens), the paper's input. B is the timed step's batch.
MEMORY_SHAPES = {"cpu": dict(B=1, num_frames=8, img_size=112), "cuda": dict(B=8, num_frames=16, img_size=224)}
# --benchmark-disable: a two-block model, one quick pass of every path.
MEMORY_SMOKE = dict(B=1, num_frames=4, img_size=32, overrides=dict(dim=128, depth=2, num_heads=2, temporal_depth=1))
# Budgets in GiB, overridden by VIVIT_CPU_MEMORY_BUDGET_GIB / VIVIT_CUDA_MEMORY_BUDGET_GIB. CPU: ViViT-B's
# weights, gradients and AdamW state take 1.3 GiB (models 1, 4) to 1.7 GiB (models 2, 3); 2 GiB leaves
# room for a few clips, so the searches stay within minutes on two cores. GPU: a 40 GB A100.
DEFAULT_BUDGET_GIB = {"cpu": 2.0, "cuda": 40.0}
# The search stops here (reported as "at least"): on a CPU the largest batch's step is what it costs.
BATCH_LIMIT = {"cpu": 16, "cuda": 512}
SMOKE_BATCH_LIMIT = 2
AIMED = 4  # probes aimed along the memory line before the search bisects


def implementation(spec: dict) -> str:
    """The memory_report implementation of a spec ("einsum" for the baseline backend)."""
    return EINSUM if spec["backend"] == BASELINE else spec["backend"]


def budget_bytes(device_type: str) -> int:
    gib = os.environ.get(f"VIVIT_{device_type.upper()}_MEMORY_BUDGET_GIB")
    return int(float(gib if gib else DEFAULT_BUDGET_GIB[device_type]) * 2**30)


def _batch(spec: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = spec["shape"]
    g = torch.Generator().manual_seed(0)
    video = torch.randn(batch, 3, shape["num_frames"], shape["img_size"], shape["img_size"], generator=g)
    labels = torch.randint(0, CLASSES, (batch,), generator=g)
    return video.to(device), labels.to(device)


def memory_model(spec: dict, device: torch.device) -> torch.nn.Module:
    """The model of `spec` (variant, implementation) on `device`, seeded: every implementation of a
    variant has the same weights."""
    shape = spec["shape"]
    torch.manual_seed(0)
    model = build(
        implementation(spec),
        spec["variant"],
        num_classes=CLASSES,
        num_frames=shape["num_frames"],
        img_size=shape["img_size"],
        **shape.get("overrides", {}),
    )
    return model.to(device)


def memory_skip_reason(spec: dict) -> str | None:
    # Every implementation but einsum runs "auto"'s fused kernels; without them there is nothing to compare.
    return training_skip_reason(dict(spec, backend=BASELINE if spec["backend"] == BASELINE else "auto"))


def memory_case(spec: dict) -> Case:
    """A training step of the spec's model at batch spec["shape"]["B"]."""
    device, dtype = parse_target(spec["target"])
    model = memory_model(spec, device)
    video, labels = _batch(spec, spec["shape"]["B"], device)
    return train_step_case(model, lambda: model(video), labels, device, dtype)


def _logits_and_gradient(spec: dict, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model = memory_model(spec, video.device).train()
    out = model(video)
    out.square().mean().backward()
    return out.detach(), model.patch_embed.proj.weight.grad


_einsum_results: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def check_against_einsum(spec: dict, tolerance: float = 1e-4) -> None:
    """Raise AssertionError unless the implementation's logits and tubelet-weight gradient (which
    every block's backward reaches) match the einsum model's in fp32, at batch 1 on the target
    device. A right implementation is off by ~1e-6; a block that drops a residual or normalises
    twice, by O(1)."""
    if spec["backend"] == BASELINE:
        return
    video, _ = _batch(spec, 1, torch.device(spec["target"].split("-")[0]))
    key = (spec["variant"], spec["target"], repr(spec["shape"]))
    if key not in _einsum_results:
        _einsum_results[key] = _logits_and_gradient(dict(spec, backend=BASELINE), video)
    actual = _logits_and_gradient(spec, video)
    pairs = zip(("logits", "tubelet weight gradient"), _einsum_results[key], actual)
    check_matches(f"memory {spec['variant']}: {implementation(spec)}", "einsum's", pairs, tolerance)


def kept_for_backward(spec: dict) -> dict:
    """`vivit.memory_report.count` of the spec's model at its clip size, on its device and autocast dtype."""
    device, dtype = parse_target(spec["target"])
    shape = spec["shape"]
    kept = count(
        implementation(spec),
        spec["variant"],
        device=device,
        autocast=dtype if device.type == "cuda" and dtype != torch.float32 else None,
        num_classes=CLASSES,
        num_frames=shape["num_frames"],
        img_size=shape["img_size"],
        **shape.get("overrides", {}),
    )
    return {
        "implementation": kept.implementation,
        "activation_bytes_per_clip": kept.per_clip,
        "weights_kept_bytes": kept.weights,
        "per_token_per_block_bytes": kept.per_block["blocks"] / kept.tokens["blocks"],
        "tensors_per_token_per_block": kept.tensors_per_token(),
        "tokens_per_clip": kept.tokens["blocks"],
    }


def largest_batch(
    peak_at: Callable[[int], int | None], budget: int, limit: int, slope_hint: float = 0
) -> tuple[int, dict[int, int | None]]:
    """(the largest batch b <= limit with peak_at(b) <= budget, every peak measured).

    peak_at(b): the peak bytes of a step at batch b, None when the step failed (out of memory).
    After batch 1, each probe aims at the budget from the largest batch known to fit, along the line
    through the two largest batches measured (or batches 1 and 2), at least `slope_hint` bytes per
    clip: at small batches the optimiser step, not the activations, may set the peak, and that line
    is flat. Every probe lies strictly between the largest batch that fits and the smallest that
    does not; after AIMED probes the rest bisect.
    """
    peaks: dict[int, int | None] = {}

    def fits(batch: int) -> bool:
        if batch not in peaks:
            peaks[batch] = peak_at(batch)
        return peaks[batch] is not None and peaks[batch] <= budget

    if not fits(1):
        return 0, peaks
    lo, hi = 1, limit + 1  # lo fits; hi does not (or is past the limit)
    probes = 0
    while hi - lo > 1:
        measured = sorted(b for b, peak in peaks.items() if peak is not None)
        if len(measured) < 2:
            # A second point for the line, or the hint's aim from batch 1.
            aim = 2 if slope_hint <= 0 else lo + int((budget - peaks[lo]) // slope_hint)
        elif probes < AIMED:
            a, b = measured[-2:]
            slope = max(slope_hint, (peaks[b] - peaks[a]) / (b - a))
            aim = hi - 1 if slope <= 0 else lo + int((budget - peaks[lo]) // slope)
        else:
            aim = (lo + hi) // 2
        batch = min(max(aim, lo + 1), hi - 1)
        lo, hi = (batch, hi) if fits(batch) else (lo, batch)
        probes += 1
    return lo, peaks


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)


def search_in_process(spec: dict, footprint_kib: int | None = None) -> dict:
    """The largest batch whose training step fits spec["budget_bytes"] (up to spec["batch_limit"]),
    searched in this process: the model is built and its AdamW state filled once, then each batch's
    step is measured in turn. CPU: VmHWM during the step above `footprint_kib`, this process's RSS
    before the model existed (freed tensors go back to the kernel: the probe server's mmap threshold).
    CUDA: torch.cuda.max_memory_allocated of the step (after a warm-up step: autotuning)."""
    device, dtype = parse_target(spec["target"])
    model = memory_model(spec, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # the AdamW state, without a step's activations
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def peak_at(batch: int) -> int | None:
        video, labels = _batch(spec, batch, device)
        case = train_step_case(model, lambda: model(video), labels, device, dtype, optimizer)  # noqa: F821 (del in finally)
        try:
            if device.type != "cuda":
                return cpu_peak_in_process(case, footprint_kib)
            if not stepped:  # a warm-up step first: autotuning
                case.setup()
                case.run()
            case.setup()
            torch.cuda.reset_peak_memory_stats(device)
            case.run()
            return torch.cuda.max_memory_allocated(device)
        except (RuntimeError, MemoryError) as error:
            if _out_of_memory(error):
                return None
            raise
        finally:
            stepped.append(batch)
            optimizer.zero_grad(set_to_none=True)
            del case, video, labels
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    stepped: list[int] = []
    batch, peaks = largest_batch(peak_at, spec["budget_bytes"], spec["batch_limit"], spec.get("slope_hint", 0))
    return {"largest_batch": batch, "step_peak_bytes_by_batch": {str(b): peak for b, peak in sorted(peaks.items())}}


def largest_batch_under_budget(spec: dict, smoke: bool = False, kept_per_clip: int = 0) -> dict:
    """The largest batch of `spec`'s training step within the device's budget, and the peaks measured:
    on CPU in a fresh child process (benchmarks/probe.py), on CUDA in this one. kept_per_clip (the
    activations a clip keeps) steers the first guess."""
    device, _ = parse_target(spec["target"])
    search = dict(
        spec,
        peak="budget",
        budget_bytes=budget_bytes(device.type),
        slope_hint=kept_per_clip,
        batch_limit=SMOKE_BATCH_LIMIT if smoke else BATCH_LIMIT[device.type],
    )
    if smoke:
        search["threads"] = 1  # the smoke run's tiny steps: one thread, as `measure` does
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    result = probe_in_child(search) if device.type == "cpu" else search_in_process(search)
    return {
        "budget_bytes": search["budget_bytes"],
        "batch_limit": search["batch_limit"],  # largest_batch == batch_limit: at least that many
        **result,
        "budget_method": (
            "torch.cuda.max_memory_allocated of a step (weights, gradients, AdamW state included)"
            if device.type == "cuda"
            else "VmHWM of a fresh child during a step, above its footprint before the model was built"
        ),
    }
