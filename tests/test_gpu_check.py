"""`make gpu-check` (tools/gpu_check.py): its no-CUDA path end to end, and the report it builds
from each part's output, without a GPU and without running the whole inspection."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_without_cuda_it_says_so_skips_tests_and_benchmarks_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no CUDA device, whatever the machine has
    command = [sys.executable, "tools/gpu_check.py", "--parts", "tests,bench", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no CUDA device here" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device"] is None and report["ok"]
    assert set(report["parts"]) == {"tests", "bench"}
    for part in report["parts"].values():
        assert part == {"status": "skipped", "reason": "no CUDA device on this machine"}
    table = (tmp_path / "report.md").read_text()
    assert "| tests | skipped |" in table and "| bench | skipped |" in table and "Device: none" in table


def test_unknown_part_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--parts", "tests,gpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unknown part(s) gpu" in capsys.readouterr().err


def test_pytest_part_reports_counts_and_each_failure(tmp_path):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_wrong(): assert 1 == 2, 'off by one'\n"
        "def test_later(): pytest.skip('no GPU')\n"
    )
    part = gpu_check.pytest_part("tests", [str(tests)], tmp_path)
    assert part["status"] == "failed" and part["exit_status"] == 1
    assert (part["tests"], part["passed"], part["failures"], part["skipped"]) == (3, 1, 1, 1)
    assert len(part["failures_list"]) == 1 and "test_wrong: AssertionError: off by one" in part["failures_list"][0]
    assert (tmp_path / "tests.log").exists()


ROWS = [
    {
        "name": "attention_fwd[fp16, BLOCK_M=128]",
        "arch": 90,
        "autotune_candidate": True,
        "registers": 200,
        "shared": 65536,
        "spill_loads": 0,
        "spill_stores": 0,
        "error": None,
    },
    {
        "name": "attention_fwd[fp32, BLOCK_M=128]",
        "arch": 90,
        "autotune_candidate": False,
        "registers": 255,
        "shared": 32768,
        "spill_loads": 4,
        "spill_stores": 4,
        "error": None,
    },  # pruned: its spills do not count
    {
        "name": "attention_bwd_dq[fp16, BLOCK_M=64]",
        "arch": 90,
        "autotune_candidate": True,
        "registers": 255,
        "shared": 1024,
        "spill_loads": 1,
        "spill_stores": 1,
        "error": None,
    },
    {"name": "tubelet_fwd[bf16, BLOCK_M=64]", "arch": 90, "autotune_candidate": True, "error": "CompilationError: x"},
]


def test_inspect_part_compiles_for_this_gpu_and_reports_what_fails(tmp_path, monkeypatch):
    commands = []

    def fake_run(command, log, show_stderr=False, env=None):
        commands.append(command)
        assert env["TRITON_INTERPRET"] == "0"  # the tool need not start itself again to compile
        if "--plan" in command:
            return 0, 1.0, json.dumps({"compiles": 3748, "estimate_s": 3790, "scope": "..."}) + "\n"
        assert show_stderr  # its progress reaches the user
        return 1, 1.0, "table\n" + json.dumps(ROWS) + "\n"

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    device = {"name": "H100", "arch": 90, "sms": 132, "memory_gib": 79.6, "count": 1, "torch": "2.x"}
    part = gpu_check.inspect_part(tmp_path, device, True, ["--filter", "fwd"])
    assert commands[0][-5:] == ["--arch", "90", "--candidates", "--filter", "fwd"] and "--json" in commands[0]
    assert part["status"] == "failed" and part["compiles"] == 4
    assert part["errors"] == ["tubelet_fwd[bf16, BLOCK_M=64] sm_90: CompilationError: x"]
    assert part["candidate_spills"] == ["attention_bwd_dq[fp16, BLOCK_M=64] sm_90: LDL 1 STL 1"]
    assert part["kernels"]["attention_fwd"] == {"compiles": 2, "max_registers": 255, "max_shared_kib": 64.0}
    # No GPU: one slice, quick or not, and what the whole inspection would cost, with its command.
    for quick in (False, True):
        commands.clear()
        part = gpu_check.inspect_part(tmp_path, None, quick, [])
        assert commands[0][-len(gpu_check.NO_CUDA_SLICE) :] == gpu_check.NO_CUDA_SLICE
        assert "--plan" in commands[1] and "--arch" not in commands[1] and "--candidates" not in commands[1]
        jobs = str(os.cpu_count() or 2)
        assert part["full"] == {
            "command": f"{gpu_check._python()} -m vivit_kernels.triton.inspect --jobs {jobs}",
            "compiles": 3748,
            "estimate_s": 3790,
        }
    assert gpu_check.full_inspection_text(part["full"]).startswith(
        "the full inspection (every architecture, dtype and head dim) is 3748 compiles, about 1 h 03 min: "
    )
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    assert gpu_check.main(["--parts", "inspect", "--out", str(tmp_path)]) == 1  # a failing part fails the run
    assert not json.loads((tmp_path / "report.json").read_text())["ok"]
    assert "the full inspection" in (tmp_path / "report.md").read_text()

    benchmarks = tmp_path / "bench.json"
    benchmarks.write_text(
        json.dumps(
            {
                "benchmarks": [
                    {
                        "name": "test_attention[vivit_b-cuda-float16-split-forward-triton]",
                        "stats": {"median": 0.000125},
                        "extra_info": {"flop_per_s": 4.2e14, "speedup_vs_torch": 3.14159},
                    }
                ]
            }
        )
    )
    rows = gpu_check.summarise_benchmarks(benchmarks)
    assert rows == [
        {
            "name": "test_attention[vivit_b-cuda-float16-split-forward-triton]",
            "median_ms": 0.125,
            "tflop_per_s": 420.0,
            "speedup_vs_torch": 3.14,
            "speedup_vs_einsum": None,
        }
    ]
    report = {
        "device": device,
        "quick": True,
        "seconds": 2.0,
        "parts": {
            "inspect": part,
            "bench": {
                "status": "passed",
                "seconds": 1.0,
                "tests": 1,
                "passed": 1,
                "failures": 0,
                "errors": 0,
                "skipped": 0,
                "benchmarks": rows,
            },
        },
    }
    table = gpu_check.markdown(report)
    assert "| inspect | failed | 1.0 | 4 compiles, 1 errors, 1 autotune candidates spilling |" in table
    assert "- attention_bwd_dq[fp16, BLOCK_M=64] sm_90: LDL 1 STL 1" in table
    assert "| test_attention[vivit_b-cuda-float16-split-forward-triton] | 0.125 | 420.0 | 3.14 | - |" in table


def test_run_shows_stderr_as_it_comes_and_logs_both(tmp_path, capfd):
    """The inspection's progress goes to stderr: gpu-check passes it on while it waits for the rows."""
    code = "import sys; print('progress', file=sys.stderr, flush=True); print('rows'); sys.exit(3)"
    status, _, stdout = gpu_check._run([sys.executable, "-c", code], tmp_path / "x.log", show_stderr=True)
    assert (status, stdout) == (3, "rows\n")
    assert capfd.readouterr().err == "progress\n"
    log = (tmp_path / "x.log").read_text()
    assert "rows" in log and "--- stderr ---\nprogress" in log
    gpu_check._run([sys.executable, "-c", code], tmp_path / "x.log")
    assert capfd.readouterr().err == ""


def test_memory_part_without_cuda_checks_the_planner_on_the_cpu_and_reports_it(tmp_path, monkeypatch, cpu_kernels):
    """No CUDA device: the memory part runs its checks on the CPU at the tiny config (MemTracker
    measuring), says the CUDA checks were skipped and why, and passes."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    assert gpu_check.main(["--parts", "memory", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    part = report["parts"]["memory"]
    assert report["ok"] and part["status"] == "passed" and part["exit_status"] == 0
    assert part["cuda"] == {"status": "skipped", "reason": "no CUDA device on this machine"}
    assert (part["device"], part["precision"], part["optimizer"]) == ("cpu", "bf16", "adamw")
    assert "--quick" in part["command"] and "MemTracker" in part["measured_by"]
    rows = part["comparisons"]
    assert [(r["variant"], r["policy"]) for r in rows] == [
        ("spatio_temporal", "default"),
        ("factorised_self_attention", "default"),
    ]
    for r in rows:
        assert r["ok"] and r["error"] == round(r["predicted_bytes"] / r["measured_bytes"] - 1, 5)
        assert abs(r["error"]) <= 0.05 and r["phase"] == "backward"  # the activations set the peak
    budget = part["budget"]
    assert budget["ok"] and budget["fits"] and budget["micro_batch"] * budget["accum_steps"] == budget["global_batch"]
    within, over = budget["steps"]
    assert within["micro_batch"] == budget["micro_batch"] and within["measured_bytes"] <= budget["budget_bytes"]
    assert over["micro_batch"] == budget["largest_micro_batch"] + 1 and over["measured_bytes"] > budget["budget_bytes"]
    assert over["predicted_bytes"] > budget["budget_bytes"] >= within["predicted_bytes"]
    assert part["failures_list"] == []
    table = (tmp_path / "report.md").read_text()
    assert "| memory | passed |" in table and "the CUDA checks skipped: no CUDA device on this machine" in table
    assert "| spatio_temporal | default | 8 | backward |" in table and "| over the budget |" in table


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_memory_check_fails_a_prediction_10_percent_off(factor, monkeypatch, one_thread, cpu_kernels):
    """A planner that predicts 10% low (or high) fails every comparison; 10% low also plans a
    micro-batch whose step measures over its budget."""
    from vivit import planning, planning_check

    predict_peak = planning.predict_peak

    def planted(*args, **kwargs):
        return {k: factor * v for k, v in predict_peak(*args, **kwargs).items()}

    monkeypatch.setattr(planning, "predict_peak", planted)
    part = planning_check.memory_check(quick=True, device="cpu", log=lambda line: None)
    assert part["status"] == "failed"
    for r in part["comparisons"]:
        assert not r["ok"] and abs(r["error"] - (factor - 1)) < 0.04
    assert len(part["failures_list"]) >= 2 and "the bar is 5%" in part["failures_list"][0]
    if factor < 1:
        assert not part["budget"]["ok"] and not part["budget"]["steps"][0]["ok"]
        assert "expected within the budget" in part["failures_list"][-1]


def test_memory_budget_check_needs_the_plan_to_fit_and_one_clip_more_not_to(monkeypatch, one_thread, cpu_kernels):
    """Measurements planted on either side of the budget: one clip more than the plan's policies fit
    must not fit (out of memory counts as not fitting), and the plan's micro-batch must."""
    from vivit import planning_check

    setting = planning_check.cpu_setting()
    budget = planning_check.budget_for(setting)
    for measured, ok in ((budget, (True, False)), (None, (False, True)), (budget + 1, (False, True))):
        monkeypatch.setattr(planning_check, "_measure", lambda *args, m=measured: m)
        result = planning_check.budget_check(setting, budget)
        assert tuple(s["ok"] for s in result["steps"]) == ok and not result["ok"]
        assert len(result["failures"]) == 1
    nothing = planning_check.budget_check(setting, 1000)
    assert not nothing["fits"] and not nothing["ok"] and "nothing fits" in nothing["failures"][0]


def test_memory_check_refuses_cuda_measurement_without_cuda(monkeypatch, capsys):
    from vivit import ViViTConfig, planning_check
    from vivit.planning import measure_peak

    config = ViViTConfig(**planning_check.TINY)
    with pytest.raises(ValueError, match="measure_peak: method 'allocator' needs a model on a CUDA device, got one"):
        measure_peak(planning_check.ViViT(config), batch=1, method="allocator")
    with pytest.raises(ValueError, match="measure_peak: method"):
        measure_peak(planning_check.ViViT(config), batch=1, method="nvml")
    monkeypatch.setattr(planning_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        planning_check.main(["--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: there is no CUDA device here" in capsys.readouterr().err
