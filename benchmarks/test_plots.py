"""benchmarks/plots.py on a small made-up run: the figures are drawn from the rows they need, and the
memory table reads the memory case's figures. Not a benchmark: it runs under --benchmark-disable too."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="benchmarks/plots.py draws with matplotlib: pip install matplotlib")

from vivit.memory_report import IMPLEMENTATIONS

from .plots import load_rows, main, memory_table

MIB = 2**20


def _run(tmp_path) -> str:
    benchmarks = []
    for i, impl in enumerate(IMPLEMENTATIONS):
        extra = dict(
            op="memory",
            case="factorised_dot_product",
            backend="reference" if impl == "einsum" else impl,
            pass_="train step",
            device="cpu",
            dtype="float32",
            shape="B=1, num_frames=8, img_size=112",
            median_s=0.5 + 0.1 * i,
            activation_bytes_per_clip=(100 - 15 * i) * MIB,
            tensors_per_token_per_block=16.0 - i,
            largest_batch=min(2 + 4 * i, 16),
            batch_limit=16,
            budget_bytes=5 * 2**29,
            step_peak_bytes_by_batch={"1": 1400 * MIB, "2": 1500 * MIB},
        )
        extra["pass"] = extra.pop("pass_")
        benchmarks.append(dict(extra_info=extra, stats=dict(median=extra["median_s"])))
    for T in (4, 8, 16):
        for backend, cost in (("reference", 2.0), ("cpu", 1.0)):
            extra = dict(
                op="attention",
                case="temporal",
                backend=backend,
                device="cpu",
                dtype="float32",
                shape=f"B=1, T={T}, S=196, H=12, Dh=64",
                median_s=cost * T * 1e-3,
            )
            extra["pass"] = "forward+backward"
            benchmarks.append(dict(extra_info=extra, stats=dict(median=extra["median_s"])))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(benchmarks=benchmarks)))
    return str(path)


def test_draws_every_figure_beside_the_json(tmp_path, capsys):
    main([_run(tmp_path)])
    for name in ("memory.png", "step_time.png", "attention_frames.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "wrote" in capsys.readouterr().out


def test_memory_table_ratios_and_limits(tmp_path):
    lines = memory_table(load_rows(_run(tmp_path)))
    assert "budget 2.5 GiB" in lines[0]
    rows = {line.split(" | ")[1]: line for line in lines[3:8]}
    assert rows["einsum"].startswith("| 4 fact. dot-product | einsum | 100.0 MiB | 1.00x | 16.00 | 500 ms | 2 |")
    assert "| 40.0 MiB | 2.50x |" in rows["fused+ckpt"]
    assert rows["fused+lean"].endswith("| 14 | 1400 MiB |")
    assert rows["fused+ckpt"].endswith("| >=16 | 1400 MiB |")  # the search's limit: at least 16


def test_no_rows_no_figures(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(benchmarks=[])))
    main([str(path)])
    assert "no figure" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))
