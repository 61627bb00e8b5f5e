"""GPU-compile inspection (`python -m vivit_kernels.triton.inspect`): no GPU needed.

Compiling for sm_80/sm_90 catches what the interpreter cannot (tl.dot shapes, register spills,
shared memory). Compiling everything takes many minutes on 2 cores, so the test compiles the
worst case of every autotune candidate: each (kernel, config, dtype) at the largest padded head
dim that config may serve for that dtype (`_prune`'s limit), where its tiles, registers and
shared memory are largest. The compiles run in a pool of 2 processes, for both architectures.
ptxas can still spill once at a smaller head dim (seen: 1 LDL/STL at 128 registers), so
`python -m vivit_kernels.triton.inspect`, which compiles every kernel x config x dtype x head
dim (`--candidates` only those the autotuner may pick), stays the check after a table change.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def _worst_cases() -> list:
    """Per (kernel, constexprs other than BLOCK_D, warps, stages, dtype): the autotune candidate
    spec with the largest BLOCK_D."""
    from vivit_kernels.triton import specs

    worst = {}
    for spec in specs.attention_specs():
        if not spec.autotune_candidate:
            continue
        others = tuple(sorted((k, v) for k, v in spec.constexprs.items() if k != "BLOCK_D"))
        key = (spec.fn.__name__, others, spec.num_warps, spec.num_stages, spec.dtype)
        if key not in worst or spec.constexprs["BLOCK_D"] > worst[key].constexprs["BLOCK_D"]:
            worst[key] = spec
    return list(worst.values())


@pytest.fixture(scope="module")
def worst_cases():
    return _worst_cases()


@pytest.fixture(scope="module")
def rows(worst_cases):
    # A fresh process: this one runs the kernels interpreted (TRITON_INTERPRET=1), and Triton
    # decides interpreted-or-compiled when a kernel module is imported.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    names = "|".join(re.escape(s.name) for s in worst_cases)
    result = subprocess.run(
        [sys.executable, "-m", "vivit_kernels.triton.inspect", "--json", "--jobs", "2", "--filter", f"^(?:{names})$"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.stdout, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_worst_cases_cover_every_candidate_config_dtype_and_arch(rows, worst_cases):
    from vivit_kernels.triton import attention

    assert sorted((r["name"], r["arch"]) for r in rows) == sorted((s.name, a) for s in worst_cases for a in (80, 90))
    kernels = {r["name"].split("[")[0] for r in rows}
    assert kernels == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_delta"}
    configs = len(attention._FWD_CONFIGS) + len(attention._DKDV_CONFIGS) + len(attention._DQ_CONFIGS) + 1
    assert len(worst_cases) == configs * 3  # every config is a candidate for every dtype at some head dim
    # fp32 dQ at head dim 128 (padded; head dims 65..128) once spilled: it must be among them.
    assert any(s.dtype == "fp32" and "bwd_dq" in s.name and s.constexprs["BLOCK_D"] == 128 for s in worst_cases)


def test_everything_compiles(rows):
    failed = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)


def test_half_precision_uses_tensor_cores(rows):
    """fp16/bf16 dots must lower to HMMA (sm_80) / HGMMA (sm_90); the delta kernel has no dot."""
    dots = [r for r in rows if r["dtype"] in ("fp16", "bf16") and "delta" not in r["name"]]
    assert dots
    missing = [f"{r['name']} sm_{r['arch']}" for r in dots if not r["tensor_core"]]
    assert not missing, missing


def test_autotune_candidates_do_not_spill_or_overflow_shared_memory(rows):
    from vivit_kernels.triton.inspect import SHARED_LIMIT

    candidates = [r for r in rows if r["autotune_candidate"] and not r["error"]]
    assert candidates
    bad = [
        f"{r['name']} sm_{r['arch']}: LDL {r['spill_loads']} STL {r['spill_stores']} smem {r['shared']}"
        for r in candidates
        if r["spill_loads"] or r["spill_stores"] or r["shared"] > SHARED_LIMIT[r["arch"]]
    ]
    assert not bad, "\n".join(bad)


def test_specs_cover_every_config_dtype_and_head_dim():
    """What the CLI compiles: one spec per (kernel, autotune config, dtype, padded head dim), real code path."""
    from vivit_kernels.triton import attention
    from vivit_kernels.triton import specs as compile_specs

    specs = compile_specs.attention_specs()
    configs = len(attention._FWD_CONFIGS) + len(attention._DKDV_CONFIGS) + len(attention._DQ_CONFIGS) + 1
    assert len(specs) == configs * 3 * len(compile_specs.HEAD_DIM_BLOCKS)
    # For every kernel, dtype and head dim the autotuner has at least one candidate.
    for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        for dtype in ("fp16", "bf16", "fp32"):
            for block_d in compile_specs.HEAD_DIM_BLOCKS:
                assert any(
                    s.autotune_candidate and s.name.startswith(f"{kernel}[{dtype},") and f"BLOCK_D={block_d}," in s.name
                    for s in specs
                ), (kernel, dtype, block_d)
    for spec in specs:
        assert spec.constexprs.get("UPCAST", False) is False  # the interpreter-only switch stays off
        assert set(spec.signature) == set(spec.fn.arg_names)
