"""Each pytest-benchmark row's roofline (benchmarks/measure.py): bytes moved, the bound, its fraction.

Not benchmarks: they run under --benchmark-disable (`make test`). The bytes are checked against
counts made by hand at the smoke shapes.
"""

from __future__ import annotations

import pytest

from . import cpu_ratios
from .attention import ATTENTION_SMOKE, attention_io_bytes
from .core import BACKWARD, FORWARD, TRAIN_STEP
from .measure import io_bytes, roofline, run_case
from .tubelet import TUBELET_SMOKE, tubelet_io_bytes

# ATTENTION_SMOKE: B=1, N = T*S = 4*12 = 48 tokens, H=2, Dh=64: q, k, v and the output hold 6144 elements each.
ATTENTION_ELEMENTS = 6144
# TUBELET_SMOKE: video 1*3*4*32*32 = 12288, weight 64*3*2*16*16 = 98304, bias 64, 2 x 4 tokens:
# positional embedding 8*64 = 512 and output 512.
TUBELET_ELEMENTS = 12288 + 98304 + 64 + 512 + 512


def test_attention_bytes_are_q_k_v_and_output_once_per_pass():
    # Forward: q, k, v read, the output written. Backward too: q, k, v, output, its gradient
    # read, the q, k, v gradients written.
    assert attention_io_bytes(ATTENTION_SMOKE, FORWARD, 4) == 4 * ATTENTION_ELEMENTS * 4 == 98304
    assert attention_io_bytes(ATTENTION_SMOKE, BACKWARD, 2) == 12 * ATTENTION_ELEMENTS * 2 == 147456
    # The CPU ratio runs' fp32 forward+backward is the same formula.
    assert cpu_ratios.io_bytes(ATTENTION_SMOKE) == 12 * ATTENTION_ELEMENTS * 4


def test_tubelet_bytes_are_each_tensor_once_per_pass():
    assert tubelet_io_bytes(TUBELET_SMOKE, FORWARD, 4) == TUBELET_ELEMENTS * 4 == 446720
    # Backward: the video and the output gradient read, the weight, bias and positional gradients written.
    assert tubelet_io_bytes(TUBELET_SMOKE, BACKWARD, 2) == 2 * TUBELET_ELEMENTS * 2 == 446720


def test_a_spec_gets_the_bytes_of_its_op_dtype_and_pass():
    spec = dict(op="attention", shape=ATTENTION_SMOKE, target="cuda-bfloat16", mode="joint")
    spec["pass"] = BACKWARD
    assert io_bytes(spec)[0] == 147456
    spec = dict(op="tubelet", shape=TUBELET_SMOKE, target="cpu-float32")
    spec["pass"] = FORWARD
    assert io_bytes(spec)[0] == 446720
    spec = dict(op="training", shape={}, target="cpu-float32")
    spec["pass"] = TRAIN_STEP
    assert io_bytes(spec) == (None, None)


CEILINGS = {"matmul_gflop_per_s": 100.0, "copy_gb_per_s": 20.0}


@pytest.mark.parametrize(
    "flops, moved, bound_s",
    [
        (2e9, 1e9, 0.05),  # memory-bound: 1 GB at 20 GB/s beats 2 GFLOP at 100 GFLOP/s
        (8e9, 1e8, 0.08),  # compute-bound
        (2e9, None, 0.02),  # no traffic formula: the FLOPs alone
        (0.0, None, None),  # neither (the loader)
    ],
)
def test_the_bound_is_the_slower_of_flops_and_bytes(flops, moved, bound_s):
    row = roofline(dict(flops=flops, io_bytes=moved), 0.1, CEILINGS)
    assert row["ceilings"] == CEILINGS
    assert row["bound_s"] == pytest.approx(bound_s)
    assert row["bound_fraction"] == (None if bound_s is None else pytest.approx(bound_s / 0.1))
    assert row["byte_per_s"] == (None if moved is None else pytest.approx(moved / 0.1))


def test_without_ceilings_or_a_median_the_fields_are_none():
    assert roofline(dict(flops=2e9, io_bytes=1e9), None, None) == dict(
        byte_per_s=None, ceilings=None, bound_s=None, bound_fraction=None
    )


class _SmokeBenchmark:
    """What run_case uses of pytest-benchmark's fixture, as under --benchmark-disable: one call."""

    disabled = True

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, fn, setup, rounds, warmup_rounds, iterations):
        setup()
        fn()


def test_run_case_records_the_bytes_of_the_pass():
    benchmark = _SmokeBenchmark()
    spec = dict(op="tubelet", shape_name="smoke", shape=TUBELET_SMOKE, target="cpu-float32", backend="reference")
    spec["pass"] = BACKWARD
    run_case(benchmark, spec)
    assert benchmark.extra_info["io_bytes"] == 2 * TUBELET_ELEMENTS * 4
    assert "positional embedding" in benchmark.extra_info["io_formula"]
