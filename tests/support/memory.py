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
    `vivit_kernels.saved_bytes` at batches 1 and 2 (the weights cancel in the difference). What
    `count` must agree with."""
    torch.manual_seed(0)
    model = build(implementation, variant, preset, **overrides).train()
    saved = []
    for batch in (1, 2):
        video = _video(model, batch)
        with warnings.catch_warnings(), torch.autocast(video.device.type, dtype=autocast, enabled=autocast is not None):
            warnings.simplefilter("ignore")
            saved.append(saved_bytes(model, video))
    return saved[1] - saved[0], saved[0]
