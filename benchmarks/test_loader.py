"""Video loader: training clips per second and peak memory of one loader worker, old path against
the frame-accurate decoders, on a 10-s and a 5-min Kinetics-like file (see benchmarks/loader.py).

Each decoder's clips are first checked bit for bit against the old path's; a mismatch fails the
case before anything is timed.
"""

from __future__ import annotations

import pytest

from .loader import CLIP, LOADER_BACKENDS, LOADER_SHAPES, LOADER_SMOKE, check_against_old, loader_skip_reason

CASES = [
    pytest.param(shape, backend, id=f"{shape}-{backend}") for shape in LOADER_SHAPES for backend in LOADER_BACKENDS
]


@pytest.mark.parametrize("shape_name, backend", CASES)
def test_loader(benchmark, checked, measure, shape_name, backend):
    shape = (LOADER_SMOKE if benchmark.disabled else LOADER_SHAPES)[shape_name]
    spec = dict(op="loader", shape_name=shape_name, shape=shape, target="cpu-float32", backend=backend)
    spec["pass"] = CLIP
    reason = loader_skip_reason(spec)
    if reason:
        pytest.skip(reason)
    checked(check_against_old, spec)
    benchmark.group = f"loader {shape_name}"
    measure(spec)
