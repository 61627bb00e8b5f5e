"""GPU compiles as a launch makes them (`python -m vivit_kernels.triton.inspect`): no GPU needed.

The inspection records the launchers' real launches (CPU tensors at ViViT-B shapes) and binds
them again with the launch's own binder for each target, so the compiled code is what a GPU runs
(16-byte aligned pointers, integers divisible by 16, constants). Compiling everything takes over an
hour on 2 cores, so the test compiles a slice the autotuner may pick: fp16 at the ragged head dim
80 on sm_86 (a consumer GPU: 99 KiB of shared memory per block) and fp32 at head dim 64 on sm_90,
with and without prefix tokens. `python -m vivit_kernels.triton.inspect --candidates` is the check
after a kernel or table change, and `--write-limits` rewrites limits.py from a full run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")


def _inspect(*args: str) -> tuple[list[dict], str]:
    """(rows, stderr) of the tool run with `args`."""
    # A fresh process compiles (this one interprets: Triton decides when a kernel is defined).
    command = [sys.executable, "-m", "vivit_kernels.triton.inspect", "--json", "--jobs", "2", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=900
    )
    assert result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def inspections():
    return [
        _inspect("--candidates", "--kernels", "attention", "--dtype", "fp16", "--head-dims", "80", "--arch", "86"),
        _inspect("--candidates", "--kernels", "attention", "--dtype", "fp32", "--head-dims", "64", "--arch", "90"),
    ]


@pytest.fixture(scope="module")
def rows(inspections):
    return [row for rows, _ in inspections for row in rows]


def test_says_what_it_will_compile_then_each_compile_done(inspections):
    """No silent wait: the count and a time estimate up front, then one line per compile (stderr is
    not a terminal here; on one it is a bar), then a summary."""
    for rows, stderr in inspections:
        n, arch, dtype = len(rows), rows[0]["arch"], rows[0]["dtype"]
        lines = stderr.splitlines()
        head_dim = rows[0]["head_dim"]
        assert re.fullmatch(
            rf"inspect: {n} compiles \(attention kernels; sm_{arch}; {dtype}; head dim {head_dim}; "
            r"autotune candidates\), about [^,]+ in 2 processes .*",
            lines[0],
        ), lines[0]
        assert not any("to narrow it" in line for line in lines)  # a minute's run needs no advice
        done = [line for line in lines if line.startswith("[")]
        assert [line.split("]")[0] for line in done] == [f"[{k}/{n}" for k in range(1, n + 1)]
        assert sorted(line.split("] ", 1)[1] for line in done) == sorted(f"sm_{arch} {r['name']}" for r in rows)
        # The duration as inspect.duration words it: seconds, minutes on a loaded machine.
        elapsed = r"(\d+ s|\d+ min|\d+ h \d\d min)"
        assert any(re.fullmatch(rf"inspect: {n} compiles in {elapsed}, 0 failing", line) for line in lines), stderr


def test_plan_says_how_much_the_whole_inspection_is_and_how_to_narrow_it(rows):
    result = subprocess.run(
        [sys.executable, "-m", "vivit_kernels.triton.inspect", "--plan", "--json"],
        timeout=300,
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)  # nothing compiled, no table
    assert plan["compiles"] > 10 * len(rows) and plan["estimate_s"] > 30 * 60
    assert plan["scope"].startswith("every kernel; sm_80, sm_86, sm_89, sm_90; fp32, fp16, bf16; head dims 16, 32,")
    first, narrow = result.stderr.splitlines()[:2]
    assert first.startswith(f"inspect: {plan['compiles']} compiles (every kernel;") and " h " in first
    for flag in ("--arch", "--dtype", "--head-dims", "--kernels", "--candidates", "--filter"):
        assert flag in narrow


def test_progress_and_estimates():
    from vivit_kernels.triton import inspect

    assert [inspect.duration(s) for s in (0, 49.6, 200, 3790)] == ["0 s", "50 s", "3 min", "1 h 03 min"]
    assert inspect.estimate(0, 2) == 0
    assert inspect.estimate(40, 1) == inspect.STARTUP_SECONDS + 40 * inspect.SECONDS_PER_COMPILE
    assert inspect.estimate(40, 2) <= inspect.estimate(40, 1)


def test_a_compile_that_fails_the_inspection_says_so_as_it_happens(capsys):
    from vivit_kernels.triton.inspect import Row, _Progress

    row = dict(
        launch="",
        kernel="attention_fwd",
        dtype="fp16",
        head_dim=64,
        prefix=False,
        config="",
        arch=86,
        registers=255,
        stack=0,
        shared=1024,
        spill_loads=0,
        spill_stores=0,
    )
    progress = _Progress(4)  # stderr is captured, not a terminal: a line per compile
    progress.update(Row(name="a", autotune_candidate=True, **row))
    progress.update(Row(name="b", autotune_candidate=True, **{**row, "spill_loads": 2}))
    progress.update(Row(name="c", autotune_candidate=False, **{**row, "spill_loads": 2}))  # pruned: not a failure
    progress.update(Row(name="d", autotune_candidate=True, **{**row, "shared": 200 * 1024}))
    progress.close()
    assert capsys.readouterr().err.splitlines() == [
        "[1/4] sm_86 a",
        "[2/4] sm_86 b: autotune candidate spills",
        "[3/4] sm_86 c",
        "[4/4] sm_86 d: autotune candidate over the shared memory limit",
    ]


def test_every_kernel_and_variant_compiles(rows):
    assert not [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if r["error"]]
    kernels = {(r["kernel"], r["prefix"], r["arch"]) for r in rows}
    for arch in (86, 90):
        for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
            assert {(kernel, False, arch), (kernel, True, arch)} <= kernels, (kernel, arch)
        assert ("attention_bwd_delta", False, arch) in kernels


def test_candidates_neither_spill_nor_exceed_shared_memory(rows):
    from vivit_kernels.triton.inspect import SHARED_LIMIT

    bad = [
        f"{r['name']} sm_{r['arch']}: LDL {r['spill_loads']} STL {r['spill_stores']} smem {r['shared']}"
        for r in rows
        if r["spill_loads"] or r["spill_stores"] or r["shared"] > SHARED_LIMIT[r["arch"]]
    ]
    assert not bad, "\n".join(bad)


def test_compiled_as_a_launch_is(rows):
    """The specialisation of a real launch is there: asynchronous copies and 128-bit loads (the
    bare compile of a kernel without launch attributes has neither), tensor cores for fp16."""
    dots = [r for r in rows if r["kernel"] != "attention_bwd_delta"]
    assert all(r["vector_loads"] > 0 for r in rows), [r["name"] for r in rows if not r["vector_loads"]]
    pipelined = [r for r in dots if "stages=1" not in r["name"] and (r["arch"] < 90 or r["dtype"] == "fp16")]
    assert pipelined and all(r["async_copies"] > 0 for r in pipelined)
    assert all(r["tensor_core"] > 0 for r in dots)


def test_limits_cover_every_candidate_variant_and_architecture():
    from vivit_kernels.triton import attention, limits
    from vivit_kernels.triton.inspect import ARCHS

    for kernel in ("fwd", "dkdv", "dq"):
        for config in attention._configs(kernel):
            entry = limits.LIMITS[attention.config_key(kernel, config)]
            assert set(entry) == {"2B", "2B prefix", "4B", "4B prefix"}
            assert all(set(per_arch) == set(ARCHS) for per_arch in entry.values())
    # Every kernel keeps a candidate for every variant, dtype width and inspected head dim, except
    # where the compiles found none (fp32 with a class token; the pruner then runs the smallest
    # config): dK/dV at every head dim on sm_86/89 (16x16 and 32x32 spill 1 at 32) and from 80 on
    # sm_80/90 (16x16 spills 5 at 80 on sm_90), dq from 96 everywhere (every config spills at 128,
    # the smallest with 1 LDL), the forward from 96 on sm_90. Keyed (kernel, arch): the first head dim.
    known_gaps = {
        ("dkdv", 80): 80,
        ("dkdv", 86): 0,
        ("dkdv", 89): 0,
        ("dkdv", 90): 80,
        ("fwd", 90): 96,
        **{("dq", arch): 96 for arch in (80, 86, 89, 90)},
    }
    for kernel in ("fwd", "dkdv", "dq"):
        for width in (2, 4):
            for prefix in (False, True):
                for arch in ARCHS:
                    for head_dim in limits.INSPECTED_HEAD_DIMS:
                        gap = known_gaps.get((kernel, arch)) if width == 4 and prefix else None
                        if gap is not None and head_dim >= gap:
                            continue
                        assert any(
                            attention._fits(kernel, c, width, head_dim, prefix, arch)
                            for c in attention._configs(kernel)
                        ), (kernel, width, prefix, arch, head_dim)


def test_the_pruner_reads_the_architecture(monkeypatch):
    """Per-architecture pruning: the same launch keeps other candidates on sm_86 than on sm_90 when
    limits.py says so, and an architecture it does not know gets the most cautious limit."""
    from vivit_kernels.triton import attention, common, limits

    key = attention.config_key("fwd", attention._configs("fwd")[0])
    monkeypatch.setitem(limits.LIMITS, key, {**limits.LIMITS[key], "2B": {80: 128, 86: 32, 89: 32, 90: 128}})
    monkeypatch.setattr(attention, "interpreted", lambda: False)
    prune = attention._pruner("fwd")["early_config_prune"]
    q = torch.zeros(1, 2, 16, 64, dtype=torch.float16)
    kept = {}
    for arch in (86, 90, 120):
        monkeypatch.setattr(common, "inspected_arch", arch)
        kept[arch] = prune(attention._configs("fwd"), {"Q": q}, HEAD_DIM=64, PREFIX=False)
    first = attention._configs("fwd")[0].kwargs
    assert any(c.kwargs == first for c in kept[90])
    assert not any(c.kwargs == first for c in kept[86]) and not any(c.kwargs == first for c in kept[120])


# Run with the kernels compiled (not interpreted), as on a GPU: the launch binder is the real one.
_REUSE_CHECK = """
import torch
from triton.runtime.autotuner import Autotuner
from vivit_kernels.triton import attention, inspect

launches = {}
for frames in (15, 16):
    qkv = torch.zeros(2, frames * 196, 3, 12, 64, dtype=torch.float16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    launches[frames] = []
    with inspect._recording(launches[frames], f"T={frames}", dict(dtype="fp16", head_dim=64, prefix=False)):
        attention.forward(q, k, v, frames, 0, "time_major", "split", 0.125)
assert len(launches[15]) == len(launches[16]) > 0
for short, long in zip(launches[15], launches[16]):
    assert isinstance(short.autotuner, Autotuner) and short.fn is long.fn
    assert len(short.autotuner.configs) > 1  # the GPU candidates, not the interpreter's one config
    for config in short.autotuner.configs:
        assert inspect._compile_key(short, config, 80) == inspect._compile_key(long, config, 80), config
    keys = [dict(zip(short.autotuner.arg_names, launch.args)) | launch.kwargs for launch in (short, long)]
    assert [keys[0][name] for name in attention._KEY] == [keys[1][name] for name in attention._KEY]
# A clip four times longer is another bucket of the spatial groups' tuning (it would be retuned).
assert attention._buckets((16, 196, 196, 1, 0, 0), (196, 16, 1, 196, 0, 0)) != attention._buckets(
    (64, 196, 196, 1, 0, 0), (196, 64, 1, 196, 0, 0))
print("reused")
"""


def test_a_new_clip_length_reuses_the_compiled_kernels_and_the_tuning():
    """The shape integers are not specialised and tuning is keyed on buckets of the group lengths:
    the launches of a 15-frame and a 16-frame clip bind to the same compiled kernels (for a GPU
    target) and the same autotuning keys, so a new clip length neither recompiles nor retunes."""
    result = subprocess.run(
        [sys.executable, "-c", _REUSE_CHECK],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0"},
        timeout=600,
    )
    assert result.returncode == 0 and "reused" in result.stdout, result.stderr[-3000:]
