"""How each case is measured: warm-up, timed rounds, FLOP/s, bytes saved for backward, peak memory.

Timing: one untimed warm-up call first (it builds caches, runs Triton's autotuner and pays
one-off allocations; its duration picks the number of rounds), then `benchmark.pedantic` with
an untimed setup before each round. On CUDA, setup ends with a synchronisation and every timed
call ends with one, so each round's time covers exactly the kernels of that call.

Peak memory, in bytes above what was allocated before the call (inputs, parameters and
optimiser state excluded):
- CUDA: `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`.
- CPU: the high-water mark of the resident set (`VmHWM`) of a fresh child process
  (`python -m benchmarks.measure SPEC`), reset through /proc/self/clear_refs after one warm-up
  call, minus the RSS before the call. The child runs with a fixed glibc mmap threshold, so
  freed tensors go back to the kernel and cannot hide inside the heap.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .cases import BUILDERS, Case, dtype_name, parse_target

REPO = Path(__file__).resolve().parent.parent
CPU_PEAK_METHOD = "VmHWM of a fresh child process after clear_refs, minus RSS before the call"
CPU_PEAK_IN_PROCESS = "VmHWM of this process after clear_refs, minus RSS before the call (smoke run)"
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated before"
CHILD_TIMEOUT_S = 600

# Rounds: enough to fill about `target` seconds of timed calls, within [low, high].
ROUNDS = {"cpu": dict(target=2.0, low=3, high=15), "cuda": dict(target=1.0, low=10, high=200)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_in_process(case: Case) -> int | None:
    """Peak resident bytes one (already warm) call adds to this process, or None without clear_refs."""
    case.setup()
    gc.collect()
    before = _status_kib("VmRSS")
    try:
        # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    case.run()
    return max(0, _status_kib("VmHWM") - before) * 1024


def cpu_peak_in_child(spec: dict) -> int | None:
    """`cpu_peak_in_process` of the same case, built and warmed in a fresh child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.measure", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child failed for {spec}:\n{result.stderr[-4000:]}")
    value = json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]
    return None if value is None else int(value)


def cuda_peak(case: Case) -> int:
    case.setup()
    torch.cuda.reset_peak_memory_stats(case.device)
    before = torch.cuda.memory_allocated(case.device)
    case.run()
    return torch.cuda.max_memory_allocated(case.device) - before


def _rounds(device: torch.device, first_call_s: float) -> int:
    policy = ROUNDS[device.type]
    return int(min(policy["high"], max(policy["low"], math.ceil(policy["target"] / max(first_call_s, 1e-6)))))


def run_case(benchmark, spec: dict) -> Case:
    """Build `spec`, warm it up, measure its memory, time it with `benchmark` and fill `extra_info`.

    With --benchmark-disable the same steps run once each, in-process, so the suite cannot rot.
    """
    case = BUILDERS[spec["op"]](spec)
    device, dtype = parse_target(spec["target"])

    case.setup()
    start = time.perf_counter()
    if case.flops is None:
        with FlopCounterMode(display=False) as counter:
            case.run()
        case.flops = float(counter.get_total_flops())
    else:
        case.run()
    first_call_s = time.perf_counter() - start

    saved = case.saved_bytes()
    if device.type == "cuda":
        peak, method = cuda_peak(case), CUDA_PEAK_METHOD
    elif benchmark.disabled:
        peak, method = cpu_peak_in_process(case), CPU_PEAK_IN_PROCESS
    else:
        peak, method = cpu_peak_in_child(spec), CPU_PEAK_METHOD

    rounds = _rounds(device, first_call_s)
    warmup = 2 if device.type == "cuda" else (1 if first_call_s < 0.5 else 0)
    benchmark.extra_info.update(
        {
            "op": spec["op"],
            "case": spec.get("mode", spec.get("variant", spec["op"])),
            "backend": spec["backend"],
            "pass": spec["pass"],
            "device": device.type,
            "dtype": dtype_name(dtype),
            "shape_name": spec["shape_name"],
            "shape": ", ".join(f"{k}={v}" for k, v in spec["shape"].items()),
            "flops": case.flops,
            "flop_formula": case.flop_formula,
            "saved_for_backward_bytes": saved,
            "peak_bytes": peak,
            "peak_method": method,
            "warmup_rounds": warmup + 1,
            "threads": torch.get_num_threads(),
            **case.info,
        }
    )
    benchmark.pedantic(case.run, setup=case.setup, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return case


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    case = BUILDERS[spec["op"]](spec)
    case.setup()
    case.run()  # warm-up: one-off allocations and caches are not the call's peak
    print(json.dumps({"peak_bytes": cpu_peak_in_process(case)}))


if __name__ == "__main__":
    _child(sys.argv[1])
