"""Memory: a ViViT-B training step per variant and implementation (einsum, SDPA swap, fused,
fused+lean, fused+gradient checkpointing), see benchmarks/memory.py.

Each implementation is first checked against the einsum model (logits and the first layer's
gradient, fp32). Then the step is timed, and its row gets the activation bytes kept per clip
(and per token per block) and the largest batch whose step fits the memory budget.
"""

from __future__ import annotations

import pytest

from vivit import VARIANTS

from .conftest import require_target, smoke_threads
from .core import TRAIN_STEP
from .memory import (
    MEMORY_BACKENDS,
    MEMORY_SHAPES,
    MEMORY_SMOKE,
    MEMORY_TARGETS,
    check_against_einsum,
    kept_for_backward,
    largest_batch,
    largest_batch_under_budget,
    memory_skip_reason,
)

CASES = [
    pytest.param(target, variant, backend, id=f"{target}-{variant}-{backend}")
    for target in MEMORY_TARGETS
    for variant in VARIANTS
    for backend in MEMORY_BACKENDS
]


@pytest.mark.parametrize("target, variant, backend", CASES)
def test_memory(benchmark, checked, measure, target, variant, backend):
    device, _ = require_target(target)
    smoke = benchmark.disabled
    shape = MEMORY_SMOKE if smoke else MEMORY_SHAPES[device.type]
    spec = dict(op="memory", shape_name="vivit_b", shape=shape, target=target, variant=variant, backend=backend)
    spec["pass"] = TRAIN_STEP
    spec["per_call_memory"] = False  # its own figures below, instead of another child per case
    reason = memory_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_against_einsum, spec)
    with smoke_threads(benchmark):
        figures = kept_for_backward(spec)
    benchmark.group = f"memory {target} {variant}"
    measure(spec)
    benchmark.extra_info.update(figures)
    # What autograd keeps in the timed step: its batch's activations and the weights.
    benchmark.extra_info["saved_for_backward_bytes"] = (
        figures["weights_kept_bytes"] + shape["B"] * figures["activation_bytes_per_clip"]
    )
    benchmark.extra_info.update(
        largest_batch_under_budget(spec, smoke=smoke, kept_per_clip=figures["activation_bytes_per_clip"])
    )


@pytest.mark.parametrize("limit", [1, 32, 64])
@pytest.mark.parametrize("budget", [50, 99, 100, 101, 130, 171, 1000, 10_000])
@pytest.mark.parametrize("per_clip, fixed", [(10, 90), (7, 60), (3, 95)])
def test_largest_batch_search(budget, per_clip, fixed, limit):
    """Against a linear memory model with a bump (the guess along batches 1 and 2 is off): the answer
    is the largest batch that fits, every batch it measured is consistent, and a failed step counts
    as not fitting."""

    def peak(batch: int) -> int | None:
        if batch > 40:
            return None  # out of memory
        return fixed + per_clip * batch + (5 if batch > 3 else 0)

    expected = max([b for b in range(1, limit + 1) if peak(b) is not None and peak(b) <= budget], default=0)
    found, measured = largest_batch(peak, budget, limit)
    assert found == expected
    assert all(measured[b] == peak(b) for b in measured)
    assert len(measured) <= 12


@pytest.mark.parametrize("budget_mib", [1300, 1400, 1800, 2048, 2500, 4000])
@pytest.mark.parametrize("hint", [0, 135, 100])
def test_largest_batch_search_past_the_optimizer_plateau(budget_mib, hint):
    """As the CPU memory case measures it: up to a few clips the AdamW step sets the peak (flat), then
    the activations do (139 MiB per clip). With the activations per clip as the hint the search
    needs a few probes, not a walk through every batch."""

    def peak(batch: int) -> int:
        return max(1387, 1058 + 139 * batch)

    expected = max([b for b in range(1, 17) if peak(b) <= budget_mib], default=0)
    found, measured = largest_batch(peak, budget_mib, 16, slope_hint=hint)
    assert found == expected
    assert len(measured) <= (4 if hint else 10), sorted(measured)
