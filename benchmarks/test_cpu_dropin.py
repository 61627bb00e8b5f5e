"""benchmarks/cpu_dropin.py: the converted models' CPU step times and auto's pick per attention call,
on benchmarks/dropin.py's smoke shape, and their tables (benchmarks/report.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vivit_kernels
from vivit_kernels import backends
from vivit_kernels.checks import AttentionShape

from . import cpu_dropin, provenance, report
from .cpu_ratios import time_interleaved

REPO = Path(__file__).resolve().parent.parent
FAMILY = "hf_vivit"  # the smoke ViViT: one layer, 2 heads of 32, 1 + 2 x 4 tokens
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the hf_vivit family needs transformers"
)


def test_rounds_take_turns_with_the_first_implementation_rotated():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = time_interleaved(calls, lambda: order.append("setup"), 4, lambda: order.append("|"))
    assert "".join(order).replace("setup", "s") == "sasbsc|sbscsa|scsasb|sasbsc|"
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_a_loaded_start_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provenance, "load_average", lambda: [99.0, 1.0, 1.0])
    threads = torch.get_num_threads()
    try:
        status = cpu_dropin.main(["--out", str(tmp_path / "d.json"), "--families", FAMILY, "--size", "smoke"])
    finally:
        torch.set_num_threads(threads)
    assert status == 2 and not (tmp_path / "d.json").exists()
    assert capsys.readouterr().err.startswith("cpu_dropin: not recorded: 1-min load average 99.00 >= ")


def test_an_unknown_family_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        cpu_dropin.parse_args(["--families", "timm_vit,vivit"])
    assert "unknown family vivit (families: timm_vit, timesformer, " in capsys.readouterr().err


@needs_transformers
def test_a_wrong_conversion_fails_before_anything_is_timed():
    models, _, inputs, logits = cpu_dropin.build(FAMILY, "smoke")
    converted = models[cpu_dropin.CONVERTED]
    attention = next(m for m in converted.modules() if isinstance(m, vivit_kernels.FactorisedAttention))
    with torch.no_grad():
        attention.get_submodule(attention.output_parts[0]).weight.mul_(1.01)  # the output projection
    with pytest.raises(AssertionError, match=f"^cpu_dropin {FAMILY}: converted logits differ from the original's"):
        cpu_dropin.check_and_record(FAMILY, models, inputs, logits)


def fixed_times(seconds: dict[str, list[float]], default: list[float]):
    """A time_interleaved that runs each call once and reports `seconds` (else `default`) for it."""

    def fake(calls, setup, rounds, on_round):
        for call in calls.values():
            setup()
            call()
        on_round()
        return {name: seconds.get(name, default) for name in calls}

    return fake


@needs_transformers
def test_ratios_and_a_refused_lean_conversion_from_fixed_times(monkeypatch):
    convert = vivit_kernels.convert

    def refusing(model, **options):
        if options.get("memory") == "lean":
            raise ValueError("convert: memory='lean' is not supported here")
        return convert(model, **options)

    monkeypatch.setattr(vivit_kernels, "convert", refusing)
    monkeypatch.setattr(cpu_dropin, "time_interleaved", fixed_times({"original": [0.5, 0.4]}, [0.25, 0.3]))
    ceilings = {"matmul_gflop_per_s": 100.0, "copy_gb_per_s": 20.0}
    rows, calls = cpu_dropin.measure_steps(FAMILY, "smoke", 2, lambda: None)
    cpu_dropin.fill_ceiling_fractions(rows, ceilings)
    assert [r["implementation"] for r in rows] == ["original", "converted", "converted_lean"]
    original, converted, lean = rows
    assert (original["min_ms"], original["speedup_vs_original"], original["time_vs_original"]) == (400.0, 1.0, 1.0)
    assert (converted["min_ms"], converted["speedup_vs_original"], converted["time_vs_original"]) == (250.0, 1.6, 0.625)
    flops = converted["flops"]
    assert converted["gflop_per_s"] == round(flops / 0.25 / 1e9, 2) and flops > 0
    assert converted["ceiling_fraction"] == round(flops / 0.25 / 100e9, 3)
    assert lean["refused"] == "convert: memory='lean' is not supported here"
    assert lean["min_ms"] is None and lean["time_vs_original"] is None and lean["times_ms"] == []
    assert "| refused " in report.dropin_table(rows)[2]

    monkeypatch.setattr(cpu_dropin, "time_interleaved", fixed_times({"sdpa": [0.003, 0.004]}, [0.002, 0.0015]))
    (call,) = cpu_dropin.measure_attention_calls(FAMILY, calls, 2, lambda: None)
    assert (call["mode"], call["calls"]) == ("joint", 1)
    if call["backend"] == "sdpa":  # no fused CPU backend here: auto's pick is sdpa itself
        assert call["speedup_vs_sdpa"] == 1.0
    else:
        assert (call["auto_ms"], call["sdpa_ms"], call["speedup_vs_sdpa"]) == (1.5, 3.0, 2.0)


@needs_transformers
def test_cpu_dropin_end_to_end_on_the_smoke_shape(tmp_path):
    out = tmp_path / "dropin.json"
    command = [sys.executable, "-m", "benchmarks.cpu_dropin", "--out", str(out), "--families", FAMILY]
    command += ["--size", "smoke", "--rounds", "2", "--allow-loaded"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    meta, rows, shapes = data["metadata"], data["rows"], data["shapes"]
    assert meta["family"] == "cpu_dropin" and meta["threads"] == 1 and meta["rounds"] == 2
    assert meta["size"] == "smoke" and meta["skipped"] == {} and meta["targets"]["lean_time_vs_original_max"] == 1.1
    assert meta["command"].startswith("python -m benchmarks.cpu_dropin --out ")
    assert {"torch", "commit", "dirty", "date", "ceilings", "machine", "method", "flop_formula"} <= set(meta)

    assert [r["implementation"] for r in rows] == ["original", "converted", "converted_lean"]
    ms = {r["implementation"]: r["min_ms"] for r in rows}
    for row in rows:
        assert row["family"] == FAMILY and row["loaded"] == meta["loaded"] and row["refused"] is None
        assert len(row["times_ms"]) == 2 and row["min_ms"] == min(row["times_ms"]) > 0
        # Figures are rounded (ms to 3 decimals, GFLOP/s to 2): the ratios of fixed times are checked below.
        assert row["speedup_vs_original"] == pytest.approx(ms["original"] / row["min_ms"], rel=1e-2)
        assert row["time_vs_original"] == pytest.approx(row["min_ms"] / ms["original"], rel=1e-2)
        assert row["flops"] == rows[1]["flops"] > 0
        assert row["gflop_per_s"] == pytest.approx(row["flops"] / row["min_ms"] / 1e6, rel=1e-2, abs=0.01)
        rate = meta["ceilings"]["matmul_gflop_per_s"]
        assert row["ceiling_fraction"] == pytest.approx(row["gflop_per_s"] / rate, rel=1e-2, abs=1e-3)

    # One layer: one joint call over the class token and 2 x 4 patches, 2 heads of 32.
    (call,) = shapes
    assert (call["mode"], call["B"], call["T"] * call["S"] + call["prefix"], call["H"], call["Dh"]) == (
        "joint",
        1,
        9,
        2,
        32,
    )
    assert call["calls"] == 1 and call["loaded"] == meta["loaded"]
    request = backends.Request(
        call["op"],
        torch.device("cpu"),
        torch.float32,
        AttentionShape.of(
            (call["B"], call["H"], call["T"] * call["S"] + call["prefix"], call["Dh"]),
            call["T"],
            call["mode"],
            prefix=call["prefix"],
            layout=call["layout"],
        ),
    )
    assert call["backend"] == backends.select(request, "auto").name
    for side in ("auto", "sdpa"):
        assert len(call[f"{side}_times_ms"]) == 2 and call[f"{side}_ms"] == min(call[f"{side}_times_ms"]) > 0
    assert call["speedup_vs_sdpa"] == pytest.approx(call["sdpa_ms"] / call["auto_ms"], rel=1e-2)
    assert call["flops"] == 3.5 * 4 * 2 * 32 * 9 * 9

    # The report: one block of two tables, which --update writes into a page and --check accepts.
    block = report.render_file(out, allow_loaded=True)["cpu_dropin"]
    assert block[0].startswith(("`python -m benchmarks.cpu_dropin", "**Loaded run**"))
    assert block[2].startswith("| family ") and block[4].startswith(f"| {FAMILY} ")
    assert block[6].startswith("| family   | mode ") and block[8].startswith(f"| {FAMILY} | joint ")
    assert "\n".join(block) in done.stdout
    page = tmp_path / "page.md"
    page.write_text("# Drop-in\n\n<!-- bench:cpu_dropin -->\nold\n<!-- /bench:cpu_dropin -->\n")
    flags = [str(out), "--allow-loaded"]
    assert report.main([*flags, "--check", str(page)]) == 1
    assert report.main([*flags, "--update", str(page)]) == 0
    assert report.main([*flags, "--check", str(page)]) == 0


def test_the_dropin_tables_render_exactly():
    meta = {
        "family": "cpu_dropin",
        "machine": {"platform": "Linux-x86_64", "cpu": "AMD EPYC", "cores": 2},
        "load_average_start": [2.1, 1.0, 1.0],
        "load_average_end": [2.2, 1.0, 1.0],
        "load_1min_peak": 2.2,
        "loaded": True,
        "torch": "2.14.1",
        "threads": 1,
        "commit": "8d83d55768abc",
        "dirty": False,
        "command": "python -m benchmarks.cpu_dropin --out d.json",
    }
    step = dict(family="timesformer", refused=None, ceiling_fraction=0.25, gflop_per_s=25.0)
    rows = [
        dict(step, implementation="original", min_ms=400.0, speedup_vs_original=1.0, time_vs_original=1.0),
        dict(step, implementation="converted", min_ms=250.0, speedup_vs_original=1.6, time_vs_original=0.625),
        dict(step, implementation="converted_lean", min_ms=None, refused="convert: no", time_vs_original=None),
    ]
    shape = dict(family="timesformer", B=2, T=4, S=49, prefix=1, H=3, Dh=64, layout="space_major", calls=4)
    shapes = [dict(shape, mode="temporal", backend="cpu", auto_ms=2.5, sdpa_ms=5.0, speedup_vs_sdpa=2.0)]
    with pytest.raises(report.Refused):
        report.render({"metadata": meta, "rows": rows, "shapes": shapes}, "d.json")
    block = report.render({"metadata": meta, "rows": rows, "shapes": shapes}, "d.json", allow_loaded=True)
    assert list(block) == ["cpu_dropin"]
    lines = block["cpu_dropin"]
    assert lines[0].startswith("**Loaded run** (1-min load reached 2.2): `python -m benchmarks.cpu_dropin")
    assert lines[1:] == [
        "",
        "| family      | original | converted | converted speed vs original | converted, lean | lean time / original "
        "| converted GFLOP/s (of matmul ceiling) | loaded |",
        "|-------------|----------|-----------|-----------------------------|-----------------|----------------------"
        "|---------------------------------------|--------|",
        "| timesformer | 400.0 ms | 250.0 ms  | 1.60x                       | refused         | -                    "
        "| 25.0 (25%)                            | yes    |",
        "",
        "| family      | mode     | B | T | S  | prefix | H | Dh | layout      | calls | auto picks | auto   "
        "| sdpa   | auto speed vs sdpa | loaded |",
        "|-------------|----------|---|---|----|--------|---|----|-------------|-------|------------|--------"
        "|--------|--------------------|--------|",
        "| timesformer | temporal | 2 | 4 | 49 | 1      | 3 | 64 | space-major | 4     | cpu        | 2.5 ms "
        "| 5.0 ms | 2.00x              | yes    |",
    ]
