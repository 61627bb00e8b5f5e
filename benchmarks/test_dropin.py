"""Drop-in: a training step of each family `vivit_kernels.convert` takes, converted against the
original (see benchmarks/dropin.py).

Each converted model is first checked against its original (logits and the first layer's
gradient, fp32); a mismatch fails the case before anything is timed.
"""

from __future__ import annotations

import pytest

from .conftest import require_target
from .core import TRAIN_STEP
from .dropin import (
    DROPIN_BACKENDS,
    DROPIN_SHAPES,
    DROPIN_SMOKE,
    DROPIN_TARGETS,
    FAMILIES,
    check_against_original,
    dropin_skip_reason,
)

CASES = [
    pytest.param(target, family, backend, id=f"{target}-{family}-{backend}")
    for target in DROPIN_TARGETS
    for family in FAMILIES
    for backend in DROPIN_BACKENDS
]


@pytest.mark.parametrize("target, family, backend", CASES)
def test_dropin(benchmark, checked, measure, target, family, backend):
    device, _ = require_target(target)
    shape = DROPIN_SMOKE if benchmark.disabled else DROPIN_SHAPES[device.type][family]
    shape_name = "small" if device.type == "cpu" else "base"
    spec = dict(op="dropin", shape_name=shape_name, shape=shape, target=target, variant=family, backend=backend)
    spec["pass"] = TRAIN_STEP
    reason = dropin_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_against_original, spec)
    benchmark.group = f"dropin {shape_name} {target} {family}"
    measure(spec)
