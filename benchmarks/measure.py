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
  are forked from a small server (`python -m benchmarks.probe --serve`, benchmarks/probe.py) that
  has imported torch and nothing else heavy, and run with a fixed glibc mmap threshold, so freed
  tensors go back to the kernel and cannot hide inside the heap.

The memory case's budget search (benchmarks/memory.py) runs in one such child per variant and
implementation (spec["peak"] = "budget") and measures a step's whole peak instead: VmHWM during the
step above the child's RSS before the model was built, so weights, gradients, optimiser state and
the batch count too.

Roofline: where the op has a compulsory-traffic formula (attention, tubelet) a row records its
io_bytes; elsewhere None. The timed run measures ceilings once per session and target (`ceilings`:
on CPU benchmarks.cpu_ratios.measure_ceilings at the session's threads, on CUDA a large matmul
in the target's dtype and a large device-to-device copy, timed with CUDA events after warm-up),
and each row gets bound_s, the slower of its FLOPs at the matmul rate and its bytes at the copy
rate (the FLOPs alone where bytes are unknown), and bound_fraction = bound_s / median_s. The
smoke run skips the ceilings: those fields are None there.

`python -m benchmarks.measure` runs the probe (benchmarks/probe.py, same arguments).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .attention import ATTENTION_IO_FORMULA, attention_io_bytes
from .core import Case, cpu_peak_in_process, dtype_name, parse_target, probe_in_child
from .cpu_ratios import measure_ceilings
from .probe import main
from .registry import build
from .tubelet import TUBELET_IO_FORMULA, tubelet_io_bytes

CPU_PEAK_METHOD = "VmHWM of a fresh child process after clear_refs, minus RSS before the call"
CPU_PEAK_IN_PROCESS = "VmHWM of this process after clear_refs, minus RSS before the call (smoke run)"
CUDA_PEAK_METHOD = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus allocated before"

# Rounds: enough to fill about `target` seconds of timed calls, within [low, high].
ROUNDS = {"cpu": dict(target=2.0, low=3, high=15), "cuda": dict(target=1.0, low=10, high=200)}


def cuda_peak(case: Case) -> int:
    case.setup()
    torch.cuda.reset_peak_memory_stats(case.device)
    before = torch.cuda.memory_allocated(case.device)
    case.run()
    return torch.cuda.max_memory_allocated(case.device) - before


def io_bytes(spec: dict) -> tuple[int | None, str | None]:
    """(bytes, formula) of the spec's pass where its op has a compulsory-traffic formula, else (None, None)."""
    size = torch.finfo(parse_target(spec["target"])[1]).bits // 8
    if spec["op"] == "attention":
        return attention_io_bytes(spec["shape"], spec["pass"], size), ATTENTION_IO_FORMULA
    if spec["op"] == "tubelet":
        return tubelet_io_bytes(spec["shape"], spec["pass"], size), TUBELET_IO_FORMULA
    return None, None


def cuda_ceilings(device: torch.device, dtype: torch.dtype, n: int = 8192, copy_bytes: int = 2**30) -> dict:
    """The GPU's rates in `dtype`: an n^3 matmul and a device-to-device copy of `copy_bytes`
    (read and written), each the best of 5 calls timed with CUDA events after 2 untimed ones."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty_like(a)
    src = torch.ones(copy_bytes // a.element_size(), device=device, dtype=dtype)
    dst = torch.empty_like(src)

    def best(fn) -> float:
        for _ in range(2):  # warm-up: cuBLAS's choice of kernel, clocks ramping up
            fn()
        seconds = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        return min(seconds)

    with torch.cuda.device(device):
        mm, copy = best(lambda: torch.mm(a, b, out=out)), best(lambda: dst.copy_(src))
    return {
        "matmul_gflop_per_s": round(2 * n**3 / mm / 1e9, 1),
        "copy_gb_per_s": round(2 * copy_bytes / copy / 1e9, 1),
    }


def device_ceilings(target: str) -> dict | None:
    """The matmul and copy rates the rows of `target` are bounded by (None for a CPU dtype other
    than fp32: measure_ceilings times fp32)."""
    device, dtype = parse_target(target)
    if device.type == "cuda":
        return cuda_ceilings(device, dtype)
    return measure_ceilings(threads=torch.get_num_threads()) if dtype == torch.float32 else None


def roofline(info: dict, median_s: float | None, ceilings: dict | None) -> dict:
    """byte_per_s, ceilings, bound_s and bound_fraction of a row with `flops` and `io_bytes` in
    `info` (each None where unknown): bound_s is the slower of the FLOPs at the matmul rate and the
    bytes at the copy rate."""
    flops, moved = info.get("flops"), info.get("io_bytes")
    timed = median_s is not None and median_s > 0
    terms = []
    if ceilings and flops:
        terms.append(flops / (ceilings["matmul_gflop_per_s"] * 1e9))
    if ceilings and moved is not None:
        terms.append(moved / (ceilings["copy_gb_per_s"] * 1e9))
    bound = max(terms) if terms else None
    return {
        "byte_per_s": moved / median_s if timed and moved is not None else None,
        "ceilings": ceilings,
        "bound_s": bound,
        "bound_fraction": bound / median_s if timed and bound is not None else None,
    }


def _rounds(device: torch.device, first_call_s: float) -> int:
    policy = ROUNDS[device.type]
    return int(min(policy["high"], max(policy["low"], math.ceil(policy["target"] / max(first_call_s, 1e-6)))))


def run_case(benchmark, spec: dict) -> Case:
    """Build `spec`, warm it up, measure its memory, time it with `benchmark` and fill `extra_info`.

    With --benchmark-disable the same steps run once each, in-process, so the suite cannot rot.
    """
    case = build(spec)
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

    moved, io_formula = io_bytes(spec)
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
            "io_bytes": moved,
            "io_formula": io_formula,
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
    sys.exit(main())
