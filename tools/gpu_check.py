"""`make gpu-check`: one command for a GPU owner, one report (report.json and report.md).

Parts, in this order (`--parts` picks some):
  inspect  `python -m vivit_kernels.triton.inspect`: every kernel compiled as a launch would,
           registers, spills, shared memory. It needs no GPU and runs anywhere; on a GPU only
           that GPU's architecture is compiled. Without one it compiles one slice (NO_CUDA_SLICE:
           one architecture's autotune candidates at one dtype and head dim, about a minute on
           2 cores) and says what the full inspection costs and how to run it (over an hour).
  tests    every test that runs on CUDA: the Triton kernels compiled on the device in fp32, fp16
           and bf16 against float64 references (tests/test_cuda_kernels.py: real bf16 dots,
           ViViT-B sizes, determinism, a second device, CUDA autocast; test_triton_attention.py,
           test_triton_tubelet.py on the device) and the ops on CUDA (test_ops.py: opcheck,
           torch.compile).
  bench    `pytest benchmarks/ --benchmark-only` on the CUDA targets.
  memory   `python -m vivit.planning_check`: the memory planner against real training steps
           (ViViT-B, 16 x 224 x 224, bf16 autocast, AdamW). Each variant's predicted peak at policies
           default and lean against torch.cuda.max_memory_allocated of a step at batch 2 (within 5%
           either way), and a plan for 40% of the device's memory at a global batch of 64: its
           micro-batch's step must measure within the budget, one clip more than its policies fit
           must measure over. Without a GPU the same checks run on the CPU at a tiny config
           (MemTracker measuring, seconds), and the CUDA checks are reported as skipped.

`--quick` runs a subset: the ViViT-B and device-level cases of test_cuda_kernels.py, the autotune
candidates of the inspection, the fp16 forward benchmarks, the memory checks of models 1 and 3 at
policy default (and the budget check). Without a CUDA device the tests and benchmarks are reported
as skipped, with the reason, and the exit status is that of the parts that ran (0 when they passed).

    python tools/gpu_check.py [--quick] [--parts inspect,tests,bench,memory] [--out runs/gpu-check]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("inspect", "tests", "bench", "memory")
CUDA_TESTS = [
    "tests/test_cuda_kernels.py",
    "tests/test_triton_attention.py",
    "tests/test_triton_tubelet.py",
    "tests/test_ops.py",
]
# Compiles for sm_80/sm_90: the inspect part does that, for every kernel.
CUDA_TESTS_DESELECT = ["tests/test_triton_tubelet.py::test_kernels_compile_for_sm80_and_sm90_without_spills"]
QUICK_TESTS = (
    ["tests/test_cuda_kernels.py"],
    "B1H12T16S196 or 2x3x16x224x224 or deterministic or another_device or autocast",
)
BENCH_SELECT = {False: "cuda", True: "cuda and float16 and not bfloat16 and not backward"}
# A consumer GPU (99 KiB of shared memory per block, the tightest budget), the training dtype, the
# head dim of ViT-S/B: 40 compiles.
NO_CUDA_SLICE = ["--arch", "86", "--dtype", "fp16", "--head-dims", "64", "--kernels", "attention", "--candidates"]


def cuda_device() -> dict | None:
    """The CUDA device the checks run on (name, capability, SMs), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "arch": 10 * props.major + props.minor,
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "torch": torch.__version__,
    }


def _run(command: list[str], log: Path, show_stderr: bool = False, env: dict | None = None) -> tuple[int, float, str]:
    """Run `command` in the repository root; stdout and stderr to `log`, stderr also to this
    process's stderr as it comes when `show_stderr` (progress). (exit status, seconds, stdout)."""
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(process.stdout.read()))
    reader.start()
    stderr = []
    for line in process.stderr:
        stderr.append(line)
        if show_stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
    reader.join()
    code = process.wait()
    log.write_text(f"$ {shlex.join(command)}\n{stdout[0]}\n--- stderr ---\n{''.join(stderr)}")
    return code, time.monotonic() - start, stdout[0]


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def summarise_inspection(rows: list[dict]) -> dict:
    """Counts, and the rows that fail the inspection's rules: errors, and autotune candidates
    that spill (the tool's exit status also covers shared memory)."""
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in rows if r.get("error")]
    spills = [
        f"{r['name']} sm_{r['arch']}: LDL {r['spill_loads']} STL {r['spill_stores']}"
        for r in rows
        if not r.get("error") and r.get("autotune_candidate") and (r.get("spill_loads") or r.get("spill_stores"))
    ]
    kernels: dict[str, dict] = {}
    for r in rows:
        if r.get("error"):
            continue
        k = kernels.setdefault(r["name"].split("[")[0], {"compiles": 0, "max_registers": 0, "max_shared_kib": 0.0})
        k["compiles"] += 1
        k["max_registers"] = max(k["max_registers"], r.get("registers") or 0)
        k["max_shared_kib"] = max(k["max_shared_kib"], round((r.get("shared") or 0) / 1024, 1))
    return {"compiles": len(rows), "errors": errors, "candidate_spills": spills, "kernels": kernels}


def _python() -> str:
    """This interpreter, relative to the repository root when inside it (as a user would type it)."""
    path = Path(sys.executable)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else sys.executable


def inspect_command(device: dict | None, quick: bool, extra: list[str]) -> list[str]:
    """The inspection gpu-check runs: the device's architecture (every config, or the autotune
    candidates when `quick`); without a device, NO_CUDA_SLICE."""
    command = [_python(), "-m", "vivit_kernels.triton.inspect", "--json", "--jobs", str(os.cpu_count() or 2)]
    if device is None:
        command += NO_CUDA_SLICE
    else:
        from vivit_kernels.triton.inspect import ARCHS

        if device["arch"] in ARCHS:
            command += ["--arch", str(device["arch"])]
        if quick:
            command.append("--candidates")
    return command + extra


def full_inspection(out: Path) -> dict:
    """What the inspection of every architecture, dtype and head dim costs: {"command", "compiles",
    "estimate_s"} (the figures only when the tool's plan could be read)."""
    command = [_python(), "-m", "vivit_kernels.triton.inspect", "--jobs", str(os.cpu_count() or 2)]
    _, _, stdout = _run([*command, "--plan", "--json"], out / "inspect-plan.log", env=_compiling())
    try:
        plan = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        plan = {}
    figures = {k: plan[k] for k in ("compiles", "estimate_s") if k in plan} if isinstance(plan, dict) else {}
    return {"command": shlex.join(command), **figures}


def full_inspection_text(full: dict) -> str:
    from vivit_kernels.triton.inspect import duration

    cost = f"{full['compiles']} compiles, about {duration(full['estimate_s'])}: " if "compiles" in full else ""
    return f"the full inspection (every architecture, dtype and head dim) is {cost}{full['command']}"


def _compiling() -> dict:
    # The inspection compiles; told so, it need not start itself again in a compiling process.
    return {**os.environ, "TRITON_INTERPRET": "0"}


def inspect_part(out: Path, device: dict | None, quick: bool, extra: list[str]) -> dict:
    command = inspect_command(device, quick, extra)
    code, seconds, stdout = _run(command, out / "inspect.log", show_stderr=True, env=_compiling())
    part = {"command": shlex.join(command), "exit_status": code, "seconds": round(seconds, 1)}
    if device is None:
        part["full"] = full_inspection(out)
    try:
        rows = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {**part, "status": "failed", "reason": f"no JSON rows from the inspection (see {out / 'inspect.log'})"}
    part.update(summarise_inspection(rows))
    (out / "inspect.json").write_text(json.dumps(rows))
    return {**part, "status": "passed" if code == 0 else "failed"}


def summarise_junit(path: Path) -> dict:
    """Counts and failures of a pytest --junitxml report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else bad.tag}")
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failures_list": failures,
    }


def pytest_part(name: str, args: list[str], out: Path) -> dict:
    """Run pytest with `args`, its junit report read back."""
    junit = out / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *args]
    code, seconds, _ = _run(command, out / f"{name}.log")
    part = {"command": shlex.join(command), "exit_status": code, "seconds": round(seconds, 1)}
    if not junit.exists():
        return {**part, "status": "failed", "reason": f"pytest wrote no report (see {out / (name + '.log')})"}
    part.update(summarise_junit(junit))
    return {**part, "status": "passed" if code == 0 else "failed"}


def tests_part(out: Path, quick: bool, extra: list[str]) -> dict:
    if quick:
        files, select = QUICK_TESTS
        args = [*files, "-k", select]
    else:
        args = [*CUDA_TESTS, *(f"--deselect={d}" for d in CUDA_TESTS_DESELECT)]
    return pytest_part("tests", [*args, "-rs", *extra], out)


def summarise_benchmarks(path: Path) -> list[dict]:
    """One row per benchmark of a --benchmark-json file: median, FLOP/s, speedups."""
    rows = []
    for bench in json.loads(path.read_text()).get("benchmarks", []):
        info = bench.get("extra_info", {})
        rows.append(
            {
                "name": bench["name"],
                "median_ms": round(bench["stats"]["median"] * 1e3, 3),
                "tflop_per_s": round(info["flop_per_s"] / 1e12, 1) if info.get("flop_per_s") else None,
                "speedup_vs_torch": round(info["speedup_vs_torch"], 2) if info.get("speedup_vs_torch") else None,
                "speedup_vs_einsum": round(info["speedup_vs_einsum"], 2) if info.get("speedup_vs_einsum") else None,
            }
        )
    return rows


def bench_part(out: Path, quick: bool, extra: list[str]) -> dict:
    data = out / "bench.json"
    args = ["benchmarks", "--benchmark-only", "-k", BENCH_SELECT[quick], f"--benchmark-json={data}", *extra]
    part = pytest_part("bench", args, out)
    if data.exists():
        part["benchmarks"] = summarise_benchmarks(data)
    return part


def memory_part(out: Path, quick: bool, extra: list[str]) -> dict:
    """The memory planner's checks (vivit.planning_check): on the CUDA device, or on the CPU at a
    tiny config where there is none (its report's "cuda" entry then says why they were skipped)."""
    command = [_python(), "-m", "vivit.planning_check", "--json", *(["--quick"] if quick else []), *extra]
    code, seconds, stdout = _run(command, out / "memory.log", show_stderr=True)
    part = {"command": shlex.join(command), "exit_status": code, "seconds": round(seconds, 1)}
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {
            **part,
            "status": "failed",
            "reason": f"no JSON report from the memory check (see {out / 'memory.log'})",
        }
    status = result.pop("status")
    return {**part, **result, "status": "passed" if code == 0 and status == "passed" else "failed"}


def memory_summary(part: dict) -> str:
    rows = part["comparisons"]
    worst = "-" if part["worst_error"] is None else f"{100 * part['worst_error']:.2f}%"
    text = (
        f"{part['device']}, {part['model']}: {sum(r['ok'] for r in rows)} of {len(rows)} predicted peaks within "
        f"{100 * part['tolerance']:.0f}% (largest error {worst}); budget check {'passed' if part['budget']['ok'] else 'failed'}"
    )
    if part.get("cuda"):
        text += f"; the CUDA checks skipped: {part['cuda']['reason']}"
    return text


def _bytes(value) -> str:
    from vivit.planning import format_bytes

    return "-" if value is None else format_bytes(value)


def _percent(error) -> str:
    return "-" if error is None else f"{100 * error:+.2f}%"


def memory_markdown(part: dict) -> list[str]:
    """The memory part's tables: each predicted peak against the measured one, and the budget check."""
    lines = [
        "",
        f"## memory: {part['model']}, {part['precision']}, {part['optimizer']}; measured by {part['measured_by']}",
        "",
        "| variant | policy | batch | peak phase | predicted | measured | error |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['variant']} | {r['policy']} | {r['batch']} | {r['phase']} | {_bytes(r['predicted_bytes'])} | "
        f"{_bytes(r['measured_bytes'])} | {_percent(r['error'])} |"
        for r in part["comparisons"]
    ]
    budget = part["budget"]
    lines += ["", f"Budget check, {budget['variant']}: {_bytes(budget['budget_bytes'])} for a global batch of "]
    lines[-1] += f"{budget['global_batch']}: " + (
        f"plan micro-batch {budget['micro_batch']} x {budget['accum_steps']}, blocks "
        f"{', '.join(budget['policies'])}; its policies fit {budget['largest_micro_batch']} clips by prediction."
        if budget["fits"]
        else "nothing fits."
    )
    if budget.get("steps"):
        lines += ["", "| micro-batch | expected | predicted | measured | ok |", "|---|---|---|---|---|"]
        lines += [
            f"| {s['micro_batch']} | {s['expected']} the budget | {_bytes(s['predicted_bytes'])} | "
            f"{_bytes(s['measured_bytes']) if s['measured_bytes'] is not None else 'out of memory'} | "
            f"{'yes' if s['ok'] else 'NO'} |"
            for s in budget["steps"]
        ]
    return lines


def _cell(value) -> str:
    return "-" if value is None else str(value)


def markdown(report: dict) -> str:
    device = report["device"]
    lines = ["# gpu-check", ""]
    lines.append(
        f"Device: {device['name']} (sm_{device['arch']}, {device['sms']} SMs, {device['memory_gib']} GiB, "
        f"{device['count']} visible), torch {device['torch']}."
        if device
        else "Device: none (no CUDA device here)."
    )
    lines += [f"Mode: {'quick' if report['quick'] else 'full'}; {report['seconds']} s in all.", ""]
    lines += ["| part | status | seconds | summary |", "|---|---|---|---|"]
    for name, part in report["parts"].items():
        if part["status"] == "skipped":
            summary = part["reason"]
        elif "compiles" in part:
            summary = (
                f"{part['compiles']} compiles, {len(part['errors'])} errors, "
                f"{len(part['candidate_spills'])} autotune candidates spilling"
            )
        elif "tests" in part:
            summary = f"{part['passed']} passed, {part['failures'] + part['errors']} failed, {part['skipped']} skipped"
        elif "comparisons" in part:
            summary = memory_summary(part)
        else:
            summary = part.get("reason", "")
        lines.append(f"| {name} | {part['status']} | {_cell(part.get('seconds'))} | {summary} |")
    for name, part in report["parts"].items():
        if name == "inspect":
            problems = part.get("errors", []) + part.get("candidate_spills", [])
        else:
            problems = part.get("failures_list", [])
        if problems:
            lines += ["", f"## {name}: failures", ""] + [f"- {p}" for p in problems]
    inspection = report["parts"].get("inspect", {})
    if inspection.get("full"):
        lines += ["", f"Inspected: `{inspection['command']}`; {full_inspection_text(inspection['full'])}."]
    if inspection.get("kernels"):
        lines += [
            "",
            "## inspect: per kernel",
            "",
            "| kernel | compiles | max registers | max shared KiB |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['compiles']} | {v['max_registers']} | {v['max_shared_kib']} |"
            for k, v in inspection["kernels"].items()
        ]
    if "comparisons" in report["parts"].get("memory", {}):
        lines += memory_markdown(report["parts"]["memory"])
    benchmarks = report["parts"].get("bench", {}).get("benchmarks")
    if benchmarks:
        lines += [
            "",
            "## bench",
            "",
            "| benchmark | median ms | TFLOP/s | vs SDPA/Conv3d | vs einsum |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {b['name']} | {b['median_ms']} | {_cell(b['tflop_per_s'])} | {_cell(b['speedup_vs_torch'])} | "
            f"{_cell(b['speedup_vs_einsum'])} |"
            for b in benchmarks
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="a quicker subset of every part")
    parser.add_argument("--out", default="runs/gpu-check", help="folder for report.json, report.md and the logs")
    for part in PARTS:
        parser.add_argument(f"--{part}-args", default="", help=f"extra arguments for the {part} part's command")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    device = cuda_device()
    if device is None:
        print(
            "gpu-check: no CUDA device here: the tests and benchmarks are skipped"
            + ("; the inspection compiles one slice" if "inspect" in parts else "")
            + ("; the memory check runs on the CPU at a tiny config" if "memory" in parts else ""),
            flush=True,
        )
    no_cuda = skipped("no CUDA device on this machine")
    runners = {
        "inspect": lambda extra: inspect_part(out, device, args.quick, extra),
        "tests": lambda extra: tests_part(out, args.quick, extra) if device else no_cuda,
        "bench": lambda extra: bench_part(out, args.quick, extra) if device else no_cuda,
        "memory": lambda extra: memory_part(out, args.quick, extra),
    }
    report = {"device": device, "quick": args.quick, "parts": {}}
    for name in (p for p in PARTS if p in parts):
        part = runners[name](shlex.split(getattr(args, f"{name}_args")))
        report["parts"][name] = part
        print(
            f"gpu-check: {name}: {part['status']}"
            + (f" ({part['seconds']} s)" if "seconds" in part else "")
            + (f": {part['reason']}" if part.get("reason") else "")
            + (f"; the CUDA checks skipped: {part['cuda']['reason']}" if part.get("cuda") else ""),
            flush=True,
        )
        if "full" in part:
            print(f"gpu-check: {full_inspection_text(part['full'])}", flush=True)
    report["seconds"] = round(time.monotonic() - start, 1)
    report["ok"] = all(p["status"] != "failed" for p in report["parts"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    print(f"gpu-check: {'passed' if report['ok'] else 'FAILED'}; report in {out / 'report.md'} and report.json")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
