"""Factorised attention: every registered backend against the plain einsum and SDPA baselines.

Parametrised over shape (ViViT-B and a long clip), device/dtype target, mode, pass and
implementation: the plain baselines (benchmarks/attention.py: the code a user would write instead,
what speedups are against), then the registry's backends, so a newly registered one is
benchmarked without editing this file; a backend that cannot take an input is skipped with its reason.

Each implementation's output (and qkv gradient, for forward+backward) is first checked against
the einsum in float64 (float32 for fp16/bf16 targets; benchmarks/check.py): a wrong result fails
the case before anything is timed.
"""

from __future__ import annotations

import pytest

from vivit_kernels import backends
from vivit_kernels.checks import MODES

from .attention import ATTENTION_SHAPES, ATTENTION_SMOKE, PLAIN_ATTENTION, SHAPE_SKIPS, attention_skip_reason
from .check import check_attention
from .conftest import require_target
from .core import PASSES, TARGETS, UNFUSED_ATTENTION


def implementations() -> list[str]:
    """The plain einsum and SDPA baselines, the library's einsum ("reference") and "sdpa" backends,
    then every other registered backend."""
    return [*PLAIN_ATTENTION, *UNFUSED_ATTENTION] + [name for name in backends.names() if name not in UNFUSED_ATTENTION]


CASES = [
    pytest.param(shape, target, mode, pass_name, backend, id=f"{shape}-{target}-{mode}-{pass_name}-{backend}")
    for shape in ATTENTION_SHAPES
    for target in TARGETS
    for mode in MODES
    for pass_name in PASSES
    for backend in implementations()
]


@pytest.mark.parametrize("shape_name, target, mode, pass_name, backend", CASES)
def test_attention(benchmark, checked, measure, shape_name, target, mode, pass_name, backend):
    device, _ = require_target(target)
    if benchmark.disabled:
        if shape_name != "vivit_b":
            pytest.skip("--benchmark-disable: the smoke run covers this code once, with the vivit_b cases")
        shape = ATTENTION_SMOKE
    else:
        shape = ATTENTION_SHAPES[shape_name][device.type]
        if shape is None:
            pytest.skip(SHAPE_SKIPS[shape_name, device.type])
    spec = dict(op="attention", shape_name=shape_name, shape=shape, target=target, mode=mode, backend=backend)
    spec["pass"] = pass_name
    reason = attention_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_attention, spec)
    benchmark.group = f"attention {shape_name} {target} {pass_name}"
    measure(spec)
