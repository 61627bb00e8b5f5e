"""Tubelet embedding: every registered backend against nn.Conv3d, an unfold+matmul version and the einsum baseline.

ViViT-B's tokeniser (2 x 16 x 16 tubelets of a 16-frame 224 x 224 clip, D = 768), forward
and forward+backward (gradients of the weight, bias and positional embedding: a clip needs
none). Backends come from the registry; one that cannot take an input is skipped with its reason.

Each implementation's tokens (and parameter gradients, for forward+backward) are first checked
against the einsum in float64 (float32 for fp16/bf16 targets; benchmarks/check.py): a wrong
result fails the case before anything is timed.
"""

from __future__ import annotations

import pytest

from vivit_kernels import backends

from .check import check_tubelet
from .conftest import require_target
from .core import BASELINE, PASSES, TARGETS
from .tubelet import TUBELET_SHAPES, TUBELET_SMOKE, tubelet_skip_reason


def implementations() -> list[str]:
    """The einsum baseline first, then Conv3d and unfold+matmul, then every other registered backend."""
    return [BASELINE, "conv3d", "unfold_matmul"] + [name for name in backends.names() if name != BASELINE]


CASES = [
    pytest.param(shape, target, pass_name, backend, id=f"{shape}-{target}-{pass_name}-{backend}")
    for shape in TUBELET_SHAPES
    for target in TARGETS
    for pass_name in PASSES
    for backend in implementations()
]


@pytest.mark.parametrize("shape_name, target, pass_name, backend", CASES)
def test_tubelet(benchmark, checked, measure, shape_name, target, pass_name, backend):
    device, _ = require_target(target)
    shape = TUBELET_SMOKE if benchmark.disabled else TUBELET_SHAPES[shape_name][device.type]
    spec = dict(op="tubelet", shape_name=shape_name, shape=shape, target=target, backend=backend)
    spec["pass"] = pass_name
    reason = tubelet_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_tubelet, spec)
    benchmark.group = f"tubelet {shape_name} {target} {pass_name}"
    measure(spec)
