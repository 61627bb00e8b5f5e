"""A second route to `vivit.memory_report.count`'s bytes, for the tests to hold it against."""

from __future__ import annotations

import warnings

import torch

from vivit.memory_report import _video, build
from vivit_kernels import saved_bytes


def count_directly(
    implementation: str, variant: str, preset: str = "vivit_b", *, autocast: torch.dtype | None = None, **overrides
) -> tuple[int, int]:
    """(activations per clip, batch 1 with weights) of the whole model by another route: its
    `vivit_kernels.saved_bytes` at batch 1, and at batch 3 less batch 2 (the weights cancel in the
    difference; from two clips on each clip adds the same, where batch 1 can keep less). What
    `count` must agree with."""
    torch.manual_seed(0)
    model = build(implementation, variant, preset, **overrides).train()
    saved = []
    for batch in (1, 2, 3):
        video = _video(model, batch)
        with warnings.catch_warnings(), torch.autocast(video.device.type, dtype=autocast, enabled=autocast is not None):
            warnings.simplefilter("ignore")
            saved.append(saved_bytes(model, video))
    return saved[2] - saved[1], saved[0]


def step_peak(
    model: torch.nn.Module,
    *,
    batch: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    accum_steps: int = 1,
) -> int:
    """The peak of live tensor bytes of a real training step, as MemTracker counts them: what
    `vivit.planning.measure_peak` measures (a route independent of the planner's own counts)."""
    from vivit.planning import measure_peak

    return measure_peak(model, batch=batch, precision=precision, optimizer=optimizer, accum_steps=accum_steps)
