"""A full ViViT-B training step (forward, backward, AdamW) per variant: fused attention against naive einsum.

The same model is built twice, with backend "reference" (the einsum attention and tubelet
embedding) and "auto" (the fused backends that fit the device); the timed step is the
cross-entropy loss, its backward and the optimiser update (zero_grad runs untimed before it). FLOPs are counted with
FlopCounterMode during the warm-up step.

The fused model's loss and parameter gradients of one step are first checked against the einsum
model's in float64 (float32 for bf16 targets; benchmarks/check.py): a wrong result fails the
case before anything is timed.
"""

from __future__ import annotations

import pytest

from vivit import VARIANTS

from .check import check_training
from .conftest import require_target
from .core import TRAIN_STEP, training_skip_reason
from .training import TRAINING_BACKENDS, TRAINING_SHAPES, TRAINING_SMOKE, TRAINING_TARGETS

CASES = [
    pytest.param(shape, target, variant, backend, id=f"{shape}-{target}-{variant}-{backend}")
    for shape in TRAINING_SHAPES
    for target in TRAINING_TARGETS
    for variant in VARIANTS
    for backend in TRAINING_BACKENDS
]


@pytest.mark.parametrize("shape_name, target, variant, backend", CASES)
def test_training_step(benchmark, checked, measure, shape_name, target, variant, backend):
    device, _ = require_target(target)
    shape = TRAINING_SMOKE if benchmark.disabled else TRAINING_SHAPES[shape_name][device.type]
    spec = dict(op="training", shape_name=shape_name, shape=shape, target=target, variant=variant, backend=backend)
    spec["pass"] = TRAIN_STEP
    reason = training_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_training, spec)
    benchmark.group = f"training step {shape_name} {target} {variant}"
    measure(spec)
