"""How each case is measured: warm-up, timed rounds, FLOP/s, bytes saved for backward, peak memory.

Timing: one untimed warm-up call first (it builds caches, runs Triton's autotuner and pays
one-off allocations; its duration picks the number of rounds), then `benchmark.pedantic` with
an untimed setup before each round. On CUDA, setup ends with a synchronisation and every timed
call ends with one, so each round's time covers exactly the kernels of that call.

Peak memory, in bytes above what was allocated before the call (inputs, parameters and
optimiser state excluded):
- CUDA: `torch.cuda.max_memory_allocated()` after `torch.cuda.reset_peak_memory_stats()`.
- CPU: the high-water mark of the resident set (`VmHWM`) of a fresh child process, reset
  through /proc/self/clear_refs after one warm-up call, minus the RSS before the call. Children
  are forked from a small server (`python -m benchmarks.measure --serve`) that has imported
  torch and nothing else heavy, and run with a fixed glibc mmap threshold, so freed tensors go
  back to the kernel and cannot hide inside the heap.

The memory case's budget search (benchmarks/memory.py) runs in one such child per variant and
implementation (spec["peak"] = "budget") and measures a step's whole peak instead: VmHWM during the
step above the child's RSS before the model was built, so weights, gradients, optimiser state and
the batch count too.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vivit_kernels import _extension

from .cases import BUILDERS, Case, dtype_name, parse_target
from .memory import search_in_process

REPO = Path(__file__).resolve().parent.parent
CPU_PEAK_METHOD = "VmHWM of a fresh child process after clear_refs, minus RSS before the call"
CPU_PEAK_IN_PROCESS = "VmHWM of this process after clear_refs, minus RSS before the call (smoke run)"
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated before"

# Rounds: enough to fill about `target` seconds of timed calls, within [low, high].
ROUNDS = {"cpu": dict(target=2.0, low=3, high=15), "cuda": dict(target=1.0, low=10, high=200)}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_in_process(case: Case, footprint_kib: int | None = None) -> int | None:
    """Peak resident bytes one (already warm) call adds to this process (or, given `footprint_kib`,
    the peak above that footprint), or None without clear_refs."""
    case.setup()
    gc.collect()
    before = _status_kib("VmRSS") if footprint_kib is None else footprint_kib
    try:
        # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    case.run()
    return max(0, _status_kib("VmHWM") - before) * 1024


class _ProbeServer:
    """A small process that imports torch and the cases once, then forks a fresh child per measurement.

    Each child starts from the server's small footprint (no tensors, no thread pool, CUDA not
    initialised, so a child may use it), builds and warms its case, and reports what
    `_probe` measures; the fork saves the ~1.5 s import per case.
    """

    def __init__(self) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # A fixed mmap threshold: freed tensors go back to the kernel instead of hiding in the heap.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=pythonpath)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.measure", "--serve"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        atexit.register(self.close)

    def measure(self, spec: dict) -> dict:
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peak-memory server exited (status {self.process.poll()}) measuring {spec}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peak-memory child failed for {spec}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


_server: _ProbeServer | None = None


def probe_in_child(spec: dict) -> dict:
    """{"peak_bytes", "saved_bytes"} of the case, built and warmed in a fresh child process.

    peak_bytes: `cpu_peak_in_process` (None for CUDA targets, measured in the parent instead).
    saved_bytes: `vivit_kernels.saved_bytes` of the case. It runs here, not in the parent,
    because its pack hook returns each saved tensor itself: a saved output then references its
    own grad_fn through C++, a cycle Python's collector cannot see, and every measured graph
    (inputs, activations, a whole model's parameters) would stay alive for the session.
    """
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _ProbeServer()
    return _server.measure(spec)


def _probe(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("peak") == "budget":
        # The C++ kernels are loaded before the footprint is taken: code, not what a step allocates.
        with contextlib.suppress(RuntimeError):
            _extension.load()
        return search_in_process(spec, footprint_kib=_status_kib("VmRSS"))
    case = BUILDERS[spec["op"]](spec)
    case.setup()
    case.run()  # warm-up: one-off allocations and caches are not the call's peak
    peak = cpu_peak_in_process(case) if case.device.type == "cpu" else None
    return {"peak_bytes": peak, "saved_bytes": case.saved_bytes()}


def _serve() -> None:
    """One JSON spec per stdin line -> one JSON reply per stdout line, each measured in a forked child."""
    for line in sys.stdin:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            try:
                reply = _probe(json.loads(line))
            except BaseException:  # noqa: BLE001  (reported to the parent, which raises)
                reply = {"error": traceback.format_exc()}
            os.write(write_end, (json.dumps(reply) + "\n").encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read().decode().strip()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write((data or json.dumps({"error": f"the child died (wait status {status})"})) + "\n")
        sys.stdout.flush()


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

    # With --benchmark-disable (smoke shapes) everything runs in-process: what saved_bytes keeps
    # alive there (see probe_in_child) is small.
    if spec.get("per_call_memory") is False and not benchmark.disabled:
        # The case measures memory its own way (the memory case: kept per clip, a budget search).
        peak, method, saved = None, "the memory case: see its step peaks per batch", None
    elif device.type == "cuda":
        peak, method = cuda_peak(case), CUDA_PEAK_METHOD
        saved = case.saved_bytes() if benchmark.disabled else probe_in_child(spec)["saved_bytes"]
    elif benchmark.disabled:
        peak, method, saved = cpu_peak_in_process(case), CPU_PEAK_IN_PROCESS, case.saved_bytes()
    else:
        probe = probe_in_child(spec)
        peak, method, saved = probe["peak_bytes"], CPU_PEAK_METHOD, probe["saved_bytes"]

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


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:  # one spec, measured in this process
        print(json.dumps(_probe(json.loads(sys.argv[1]))))
