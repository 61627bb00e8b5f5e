"""The benchmarks' plain baselines, the CPU ratio measurement and the tables rendered from results files.

benchmarks/attention.py (plain_attention), benchmarks/cpu_ratios.py, benchmarks/report.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODES, masked_attention, relative_error

from benchmarks import cpu_ratios, provenance, report
from benchmarks.attention import PLAIN_ATTENTION
from benchmarks.core import PLAIN_EINSUM, PLAIN_SDPA, check_matches

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------ plain baselines

# Awkward sizes: 7 patches a frame, 5 frames, head dim 40, 3 heads (split: 1 spatial, 2 temporal).
B, T, S, H, DH = 2, 5, 7, 3, 40
BOUNDS = {torch.float64: 1e-13, torch.float32: 5e-6}  # an index or layout mistake is off by O(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("implementation", list(PLAIN_ATTENTION))
@pytest.mark.parametrize("mode", MODES)
def test_plain_baseline_matches_the_float64_oracle(mode, implementation, dtype, generator):
    qkv = torch.randn(B, T * S, 3 * H * DH, generator=generator, dtype=torch.float64)
    grad = torch.randn(B, T * S, H * DH, generator=generator, dtype=torch.float64)
    exact = qkv.clone().requires_grad_()
    q, k, v = exact.view(B, T * S, 3, H, DH).permute(2, 0, 3, 1, 4).unbind(0)
    expected = masked_attention(q, k, v, T, mode).transpose(1, 2).reshape(B, T * S, H * DH)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad)

    leaf = qkv.to(dtype).requires_grad_()
    out = PLAIN_ATTENTION[implementation](leaf, H, T, mode)
    out.backward(grad.to(dtype))
    assert out.shape == (B, T * S, H * DH) and out.dtype == dtype
    assert relative_error(out, expected) < BOUNDS[dtype], "output"
    assert relative_error(leaf.grad, expected_grad) < BOUNDS[dtype], "qkv gradient"


# ----------------------------------------------------------------------------------- cpu_ratios


def test_speedups_divide_each_baselines_minimum_by_the_rows():
    rows = [
        {"mode": "temporal", "T": 8, "implementation": PLAIN_EINSUM, "min_ms": 30.0},
        {"mode": "temporal", "T": 8, "implementation": PLAIN_SDPA, "min_ms": 15.0},
        {"mode": "temporal", "T": 8, "implementation": "cpu", "min_ms": 12.0},
        {"mode": "temporal", "T": 16, "implementation": "cpu", "min_ms": 20.0},  # no baseline timed at T=16
    ]
    cpu_ratios.fill_speedups(rows)
    assert [(r["speedup_vs_plain_einsum"], r["speedup_vs_plain_sdpa"]) for r in rows] == [
        (1.0, 0.5),
        (2.0, 1.0),
        (2.5, 1.25),
        (None, None),
    ]


def test_a_run_refuses_to_start_at_a_load_at_or_above_the_core_count():
    assert provenance.refuse_loaded(1.99, 2, allow_loaded=False, prog="cpu_ratios") is None
    assert provenance.refuse_loaded(9.0, 2, allow_loaded=True, prog="cpu_ratios") is None
    assert provenance.refuse_loaded(2.0, 2, allow_loaded=False, prog="cpu_ratios") == (
        "cpu_ratios: not recorded: 1-min load average 2.00 >= 2 cores; rerun on a quiet machine, or pass "
        "--allow-loaded to record it marked loaded"
    )


def test_a_loaded_start_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provenance, "load_average", lambda: [99.0, 1.0, 1.0])
    threads = torch.get_num_threads()
    try:
        status = cpu_ratios.main(["--out", str(tmp_path / "r.json"), "--modes", "temporal", "--frames", "2"])
    finally:
        torch.set_num_threads(threads)
    assert status == 2 and not (tmp_path / "r.json").exists()
    assert capsys.readouterr().err.startswith("cpu_ratios: not recorded: 1-min load average 99.00 >= ")


def test_cpu_ratios_end_to_end_on_a_tiny_shape(tmp_path):
    out = tmp_path / "ratios.json"
    tiny = "--frames 2,3 --tokens-per-frame 5 --heads 2 --head-dim 8 --rounds 2 --allow-loaded".split()
    command = [sys.executable, "-m", "benchmarks.cpu_ratios", "--out", str(out), "--modes", "temporal,split", *tiny]
    command += ["--implementations", f"{PLAIN_EINSUM},{PLAIN_SDPA},reference"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    meta, rows = data["metadata"], data["rows"]
    assert meta["threads"] == 1 and meta["rounds"] == 2 and meta["family"] == "cpu_attention"
    assert meta["command"].startswith("python -m benchmarks.cpu_ratios --out ")
    assert meta["loaded"] == (meta["load_1min_peak"] >= meta["machine"]["cores"])
    assert len(meta["load_average_start"]) == len(meta["load_average_end"]) == 3
    assert {"torch", "commit", "dirty", "date", "ceilings", "machine"} <= set(meta)
    assert [(r["mode"], r["T"], r["implementation"]) for r in rows] == [
        (mode, frames, name)
        for mode in ("temporal", "split")
        for frames in (2, 3)
        for name in (PLAIN_EINSUM, PLAIN_SDPA, "reference")
    ]
    for row in rows:
        assert len(row["times_ms"]) == 2 and row["min_ms"] == min(row["times_ms"]) > 0
        assert row["shape"] == {"B": 1, "T": row["T"], "S": 5, "H": 2, "Dh": 8}
        assert row["loaded"] == meta["loaded"]
        assert row["io_bytes"] == 12 * row["T"] * 5 * 2 * 8 * 4
        if row["implementation"] == PLAIN_EINSUM:
            assert row["speedup_vs_plain_einsum"] == 1.0
    # temporal, T=2: 10 tokens, each attends to 2 keys in each of 2 heads of 8: 4 * 10 * 2 * 2 * 8, x 3.5 with backward
    assert rows[0]["flops"] == 3.5 * 4 * 10 * 2 * 2 * 8
    assert "| temporal | 2 | plain einsum   |" in done.stdout


def test_matmul_ceiling_is_the_faster_of_blas_and_onednn():
    ceilings = cpu_ratios.measure_ceilings(tries=1)
    products = {k: v for k, v in ceilings.items() if k.startswith("matmul_") and k != "matmul_gflop_per_s"}
    expected = {"matmul_blas_gflop_per_s"} | (
        {"matmul_onednn_gflop_per_s"} if torch.backends.mkldnn.is_available() else set()
    )
    assert set(products) == expected and all(rate > 0 for rate in products.values())
    assert ceilings["matmul_gflop_per_s"] == max(products.values())


def test_bounds_come_from_the_better_ceilings_of_the_run(tmp_path, monkeypatch):
    # A slow spell at the start (half the rates) must not lower the bounds: the end's rates count.
    slow, fast = (
        {"matmul_gflop_per_s": 50.0, "copy_gb_per_s": 10.0},
        {"matmul_gflop_per_s": 100.0, "copy_gb_per_s": 20.0},
    )
    measured = iter([slow, fast])
    monkeypatch.setattr(cpu_ratios, "measure_ceilings", lambda: next(measured))
    out = tmp_path / "r.json"
    tiny = "--frames 2 --tokens-per-frame 5 --heads 2 --head-dim 8 --rounds 1 --allow-loaded".split()
    threads = torch.get_num_threads()
    try:
        assert cpu_ratios.main(["--out", str(out), "--modes", "temporal", "--implementations", "reference", *tiny]) == 0
    finally:
        torch.set_num_threads(threads)
    meta, (row,) = (lambda d: (d["metadata"], d["rows"]))(json.loads(out.read_text()))
    assert meta["ceilings"] == fast and meta["ceilings_measured"] == [slow, fast]
    assert row["bound_ms"] == round(max(row["flops"] / 100e9, row["io_bytes"] / 20e9) * 1e3, 3)


# --------------------------------------------------------------------------------------- report

METADATA = {
    "machine": {"platform": "Linux-x86_64", "cpu": "AMD EPYC", "cores": 2},
    "load_average_start": [0.21, 0.3, 0.4],
    "load_average_end": [0.5, 0.35, 0.4],
    "load_1min_peak": 0.5,
    "loaded": False,
    "torch": "2.14.1",
    "threads": 1,
    "commit": "4203b5754c0123456789",
    "dirty": False,
    "date": "2026-01-02T03:04:05+00:00",
    "command": "python -m benchmarks.cpu_ratios --out r.json",
    "family": "cpu_attention",
    "rounds": 7,
    "ceilings": {"matmul_gflop_per_s": 91.4, "copy_gb_per_s": 21.2},
}


def _row(implementation: str, min_ms: float, einsum: float, sdpa: float) -> dict:
    flops, moved = 5.4e8, 115_605_504
    return dict(
        mode="temporal",
        T=16,
        shape=dict(B=1, T=16, S=196, H=12, Dh=64),
        implementation=implementation,
        min_ms=min_ms,
        times_ms=[min_ms],
        flops=flops,
        gflop_per_s=flops / min_ms / 1e6,
        io_bytes=moved,
        io_gb_per_s=moved / min_ms / 1e6,
        bound_ms=5.9,
        speedup_vs_plain_einsum=einsum,
        speedup_vs_plain_sdpa=sdpa,
        loaded=False,
    )


RATIOS = {
    "metadata": METADATA,
    "rows": [_row("cpu", 33.0, 1.06, 0.95), _row(PLAIN_SDPA, 31.4, 1.11, 1.0), _row(PLAIN_EINSUM, 35.0, 1.0, 0.9)],
}
HEAD = (
    "`python -m benchmarks.cpu_ratios --out r.json`; AMD EPYC, 2 cores, Linux-x86_64; load 0.21/0.30/0.40 at start, "
    "0.50/0.35/0.40 at end; torch 2.14.1; 1 thread; commit 4203b5754c; 2026-01-02; min of 7 rounds; one-thread "
    "ceilings 91 GFLOP/s (matmul), 21 GB/s (copy)."
)


def test_a_ratio_row_renders_exactly():
    blocks = report.render(RATIOS, "r.json")
    table = blocks["cpu_attention"]
    assert table[:2] == [HEAD, ""]
    assert table[2] == (
        "| mode     | T  | implementation | min     | GFLOP/s | GB/s | bound  | of bound | vs plain einsum "
        "| vs plain SDPA |"
    )
    # Baselines first, whatever order the file lists them in.
    assert [line.split("|")[3].strip() for line in table[4:]] == ["plain einsum", "plain SDPA", "cpu"]
    assert table[6] == (
        "| temporal | 16 | cpu            | 33.0 ms | 16.4    | 3.5  | 5.9 ms | 18%      | 1.06x           "
        "| 0.95x         |"
    )
    assert blocks["headline"][4] == (
        "| temporal | 16 | cpu   | 33.0 ms | 35.0 ms      | 31.4 ms    | 1.06x           | 0.95x         |"
    )


def test_a_run_with_a_row_faster_than_its_bound_is_refused():
    # Ceilings measured in a slow spell put the bound above what the machine does.
    low = {"metadata": METADATA, "rows": [*RATIOS["rows"], _row("sdpa", 5.0, 7.0, 6.28)]}
    with pytest.raises(report.Refused, match=r"mode temporal, T 16, implementation sdpa took 5.0 ms, below its bound"):
        report.render(low, "r.json", allow_loaded=True)


def test_loaded_runs_are_refused_unless_allowed_and_then_marked():
    loaded = {"metadata": dict(METADATA, loaded=True, load_1min_peak=2.4), "rows": RATIOS["rows"]}
    with pytest.raises(report.Refused, match=r"r.json: measured at a 1-min load of 2.4 on 2 cores"):
        report.render(loaded, "r.json")
    table = report.render(loaded, "r.json", allow_loaded=True)["cpu_attention"]
    assert table[0].startswith("**Loaded run** (1-min load reached 2.4): `python -m benchmarks.cpu_ratios")
    assert table[2].endswith("| loaded |") and all(line.endswith("| yes    |") for line in table[4:])
    # pytest-benchmark JSON without the run's metadata: its load is unknown.
    with pytest.raises(report.Refused, match="no load average recorded"):
        report.render({"machine_info": {}, "benchmarks": []}, "bench.json")


def test_a_pytest_benchmark_file_renders_a_table_per_op_and_device():
    row = dict(
        op="attention",
        case="temporal",
        backend="cpu",
        device="cpu",
        dtype="float32",
        shape_name="vivit_b",
        median_s=0.033,
        flop_per_s=1.6e10,
        speedup_vs_einsum=1.06,
        speedup_vs_torch=0.95,
        peak_bytes=2**20,
        saved_for_backward_bytes=2**21,
    )
    row["pass"] = "forward+backward"
    data = {
        "machine_info": {"vivit": dict(METADATA, command="pytest benchmarks --benchmark-only")},
        "benchmarks": [{"extra_info": row}, {"extra_info": dict(row, backend=PLAIN_EINSUM, median_s=0.035)}],
    }
    blocks = report.render(data, "bench.json")
    assert list(blocks) == ["bench_attention_cpu"]
    table = blocks["bench_attention_cpu"]
    assert table[0].startswith("`pytest benchmarks --benchmark-only`; AMD EPYC")
    assert [line.split("|")[4].strip() for line in table[4:]] == ["plain einsum", "cpu"]


def test_a_pytest_benchmark_row_renders_its_bytes_and_fraction_of_the_bound_exactly():
    row = dict(
        op="tubelet",
        case="tubelet",
        backend="conv3d",
        device="cpu",
        dtype="float32",
        shape_name="vivit_b",
        median_s=0.02,
        flop_per_s=2e10,
        byte_per_s=3.46e9,
        bound_fraction=0.375,
        peak_bytes=2**20,
        saved_for_backward_bytes=None,
    )
    row["pass"] = "forward"
    # A training step: no traffic formula, and a file from before the ceilings.
    step = dict(row, op="training", case="factorised_encoder", backend="auto")
    step.update({"pass": "train step", "byte_per_s": None})
    del step["bound_fraction"]
    table = report.format_table([row, step])
    assert table[0] == (
        "| op / mode                    | shape   | target      | backend | pass       | median  | GFLOP/s | GB/s "
        "| of bound | vs einsum | vs SDPA/Conv3d | peak mem | saved for bwd |"
    )
    assert table[2] == (
        "| tubelet                      | vivit_b | cpu float32 | conv3d  | fwd        | 20.0 ms | 20.0    | 3.5  "
        "| 38%      | -         | -              | 1.0 MiB  | -             |"
    )
    assert table[3] == (
        "| training: factorised_encoder | vivit_b | cpu float32 | auto    | train step | 20.0 ms | 20.0    | -    "
        "| -        | -         | -              | 1.0 MiB  | -             |"
    )


def test_update_then_check_round_trip(tmp_path, capsys):
    results = tmp_path / "r.json"
    results.write_text(json.dumps(RATIOS))
    doc = tmp_path / "page.md"
    before = "# Page\n\n<!-- bench:cpu_attention -->\ntyped by hand\n<!-- /bench:cpu_attention -->\n\nAfter.\n"
    doc.write_text(before)
    assert report.main([str(results), "--check", str(doc)]) == 1
    assert "cpu_attention differ" in capsys.readouterr().err
    assert report.main([str(results), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Page\n\n<!-- bench:cpu_attention -->\n\n" + HEAD + "\n\n| mode ")
    assert text.endswith("|\n\n<!-- /bench:cpu_attention -->\n\nAfter.\n") and "typed by hand" not in text
    assert report.main([str(results), "--check", str(doc)]) == 0
    assert report.main([str(results), "--update", str(doc)]) == 0 and doc.read_text() == text
    # A stale figure in the page is caught.
    doc.write_text(text.replace("33.0 ms", "16.5 ms"))
    assert report.main([str(results), "--check", str(doc)]) == 1


def test_a_page_without_the_block_or_with_an_unclosed_marker_is_an_error(tmp_path, capsys):
    results = tmp_path / "r.json"
    results.write_text(json.dumps(RATIOS))
    doc = tmp_path / "page.md"
    doc.write_text("<!-- bench:other -->\n<!-- /bench:other -->\n")
    assert report.main([str(results), "--check", str(doc)]) == 2
    assert "no <!-- bench:NAME --> block for cpu_attention, headline" in capsys.readouterr().err
    doc.write_text("<!-- bench:cpu_attention -->\n")
    assert report.main([str(results), "--update", str(doc)]) == 2
    assert "has no matching <!-- /bench:cpu_attention -->" in capsys.readouterr().err


def test_check_matches_names_the_first_pair_off_by_more_than_the_tolerance():
    ones = torch.ones(3)
    pairs = [("logits", ones, ones * (1 + 1e-6)), ("gradient", ones, ones * 1.01)]
    check_matches("case", "the original's", pairs[:1], 1e-5)
    with pytest.raises(
        AssertionError, match=r"^case gradient differ from the original's by 1\.00e-02 relative \(> 1e-05\)$"
    ):
        check_matches("case", "the original's", pairs, 1e-5)


def test_a_tubelet_file_renders_its_own_table_exactly():
    meta = dict(RATIOS["metadata"], family="cpu_tubelet")
    row = {
        "pass": "forward",
        "implementation": "cpu",
        "min_ms": 39.71,
        "gflop_per_s": 93.16,
        "bound_ms": 38.2,
        "speedup_vs_best_baseline": 0.997,
        "best_baseline": "conv3d",
    }
    blocks = report.render({"metadata": meta, "rows": [row]}, "t.json")
    assert list(blocks) == ["cpu_tubelet"]
    assert blocks["cpu_tubelet"][-1] == (
        "| forward | cpu            | 39.7 ms | 93.2    | 38.2 ms | 96%      | 1.00x (conv3d)      |"
    )
