"""GPU-compile inspection (`python -m vivit_kernels.triton.inspect`): no GPU needed.

Compiling for sm_80/sm_90 catches what the interpreter cannot (tl.dot shapes, register spills,
shared memory). Compiling everything takes ~20 minutes on 2 cores, so the test compiles a
representative subset (`SUBSET`) in a pool of 2 processes, for both architectures;
`python -m vivit_kernels.triton.inspect` compiles every kernel x config x dtype x head dim
(`--candidates` only those the autotuner may pick).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

# One spec per line, compiled for sm_80 and sm_90: the largest tiles at the ViViT head dim 64,
# the tiles the autotuner keeps for head dim 128, both half dtypes, fp32, and the delta kernel.
SUBSET = "|".join(
    [
        r"attention_fwd\[fp16, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64,",
        r"attention_fwd\[bf16, BLOCK_M=128, BLOCK_N=32, BLOCK_D=128,",
        r"attention_fwd\[fp32, BLOCK_M=32, BLOCK_N=32, BLOCK_D=64,",
        r"attention_bwd_dkdv\[fp16, BLOCK_N=64, BLOCK_M=32, BLOCK_D=64,",
        r"attention_bwd_dkdv\[bf16, BLOCK_N=32, BLOCK_M=32, BLOCK_D=128,",
        r"attention_bwd_dq\[bf16, BLOCK_M=128, BLOCK_N=32, BLOCK_D=64,",
        r"attention_bwd_dq\[fp16, BLOCK_M=32, BLOCK_N=16, BLOCK_D=128,",
        r"attention_bwd_delta\[fp16, BLOCK_M=\d+, BLOCK_D=64\]",
    ]
)


@pytest.fixture(scope="module")
def rows():
    # A fresh process: this one runs the kernels interpreted (TRITON_INTERPRET=1), and Triton
    # decides interpreted-or-compiled when a kernel module is imported.
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "vivit_kernels.triton.inspect", "--json", "--jobs", "2", "--filter", SUBSET],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.stdout, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_subset_covers_every_kernel_and_arch(rows):
    kernels = {r["name"].split("[")[0] for r in rows}
    assert kernels == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "attention_bwd_delta"}
    assert {r["arch"] for r in rows} == {80, 90}


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

    specs = attention.compile_specs()
    configs = len(attention._FWD_CONFIGS) + len(attention._DKDV_CONFIGS) + len(attention._DQ_CONFIGS) + 1
    assert len(specs) == configs * 3 * len(attention._HEAD_DIM_BLOCKS)
    # For every kernel, dtype and head dim the autotuner has at least one candidate.
    for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
        for dtype in ("fp16", "bf16", "fp32"):
            for block_d in attention._HEAD_DIM_BLOCKS:
                assert any(
                    s.autotune_candidate and s.name.startswith(f"{kernel}[{dtype},") and f"BLOCK_D={block_d}," in s.name
                    for s in specs
                ), (kernel, dtype, block_d)
    for spec in specs:
        assert spec.constexprs.get("UPCAST", False) is False  # the interpreter-only switch stays off
        assert set(spec.signature) == set(spec.fn.arg_names)
