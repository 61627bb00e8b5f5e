"""The probe the timed run uses (a forked child: CPU peak memory, bytes saved for backward), on a known allocation.

Not a benchmark: it runs under --benchmark-disable (`make test`), so the child-process path of
the timed run cannot rot while the smoke bodies measure in-process.
"""

from __future__ import annotations

from .attention import attention_score_bytes
from .core import parse_target, probe_in_child


def test_child_probe_sees_the_einsum_score_matrices():
    # Joint attention over N = 1024 tokens: the einsum path holds 8 MiB score and probability
    # tensors; inputs (1.5 MiB) are allocated before the measured call and do not count.
    shape = dict(B=1, T=4, S=256, H=2, Dh=64)
    spec = dict(
        op="attention", shape_name="probe", shape=shape, target="cpu-float32", mode="joint", backend="reference"
    )
    spec["pass"] = "forward"
    score = attention_score_bytes("joint", shape, parse_target(spec["target"])[1])
    probe = probe_in_child(spec)
    peak = probe["peak_bytes"]
    assert peak is not None, "the child could not reset VmHWM through /proc/self/clear_refs"
    assert score <= peak < 8 * score, (
        f"peak {peak} bytes, expected between one and eight score matrices ({score} bytes)"
    )
    # Measured with inputs that require grad: the einsum path saves its probability matrix.
    assert probe["saved_bytes"] >= score
