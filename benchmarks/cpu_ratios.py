"""Attention's CPU ratios, measured so that another quiet machine gets the same numbers.

    python -m benchmarks.cpu_ratios --out runs/bench/cpu_ratios.json [--modes temporal,split]
        [--frames 8,16] [--rounds 7] [--allow-loaded]
    python -m benchmarks.report runs/bench/cpu_ratios.json     # the markdown table

Forward+backward of attention between a layer's projections: from one packed (B, N, 3 * H * Dh)
qkv leaf, with a dense (B, N, H * Dh) output gradient, fp32, no prefix tokens. Each
implementation (the plain einsum and SDPA baselines of benchmarks/attention.py, then every registry
backend that runs fp32 on the CPU) is timed at one thread by the process's CPU time per call: on
a shared machine wall time at two threads mostly times waits at parallel-region barriers. The
implementations take turns within each round, the first one rotating, so a neighbour's burst
falls on all of them; each keeps its minimum over the rounds, the figure least disturbed by the
neighbours. Speedups are a plain baseline's minimum over the implementation's.

A run refuses to start at a 1-min load average at or above the core count (a loaded neighbour
slows memory-bound code more than compute-bound code, biasing the ratios) unless
--allow-loaded, and is marked "loaded" when the load reaches the core count at any round.

JSON: {"metadata": benchmarks.provenance.run_metadata() plus "family", "method", "pass",
"dtype", "rounds", "ceilings" (one-thread matmul GFLOP/s and copy GB/s, the better of the
measurements at the run's start and end: `ceilings_measured`), "flop_formula", "io_formula"}, and
"rows", one per (mode, T, implementation): mode, T, shape {B, T, S, H, Dh}, implementation,
min_ms, times_ms (every round), flops, gflop_per_s, io_bytes, io_gb_per_s, bound_ms (the slower
of flops at the matmul rate and io_bytes at the copy rate), speedup_vs_plain_einsum,
speedup_vs_plain_sdpa, loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vivit_kernels import backends
from vivit_kernels.checks import MODES

from .attention import ATTENTION_FLOP_FORMULA, attention_flops, attention_fn, attention_io_bytes, attention_shape
from .core import BACKWARD, PLAIN_EINSUM, PLAIN_SDPA, registry_skip_reason
from .provenance import LoadWatch, add_run_arguments, parse_run_arguments
from .report import render_file

FAMILY = "cpu_attention"
BASELINES = (PLAIN_EINSUM, PLAIN_SDPA)
METHOD = (
    "forward+backward from one packed qkv leaf, dense output gradient, fp32, 1 thread, process CPU time "
    "per call, min over interleaved rounds (first implementation rotated)"
)
IO_FORMULA = (
    "12*B*N*H*Dh*4 bytes: forward reads q, k, v and writes the output; backward reads q, k, v, the "
    "output and its gradient and writes the qkv gradient (each once: a fused kernel's compulsory traffic)"
)


def implementations(shape: dict) -> list[str]:
    """The plain baselines, then every registry backend that runs this fp32 CPU call when named
    (the Triton interpreter, which "auto" passes over, is never timed)."""
    cpu = torch.device("cpu")
    runs = [
        name
        for name in backends.names()
        if all(
            registry_skip_reason("attention_packed", name, cpu, torch.float32, attention_shape(mode, shape)) is None
            for mode in MODES
        )
    ]
    return [*BASELINES, *runs]


def io_bytes(shape: dict) -> int:
    return attention_io_bytes(shape, BACKWARD, 4)


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> Callable[[], object] | None:
    """a @ b.T by oneDNN's own fp32 kernels (which the C++ kernels' block products use), or None
    where this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        a, b = a.to_mkldnn(), b.to_mkldnn()
        torch._C._nn.mkldnn_linear(a, b)
    except (AttributeError, RuntimeError):
        return None
    return lambda: torch._C._nn.mkldnn_linear(a, b)


def measure_ceilings(tries: int = 5, threads: int = 1) -> dict:
    """The fp32 matmul rate (1024^3: the faster of BLAS and oneDNN, whose kernels outrun BLAS on
    some CPUs) and copy rate (64 MiB, twice the L3, into a preallocated tensor: a fresh one would
    time first-touch page faults) at `threads` torch threads, best of `tries`. One thread is timed
    by process CPU time (a neighbour's burst does not count); more by wall time, since process
    time adds the threads' times together."""
    clock = time.process_time if threads == 1 else time.perf_counter
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.full((1024, 1024), 0.5), torch.full((1024, 1024), 0.25)
        products = {"blas": lambda: torch.mm(a, b), "onednn": _onednn_product(a, b)}
        products = {name: run for name, run in products.items() if run is not None}
        src, dst = torch.ones(16 * 2**20), torch.zeros(16 * 2**20)
        best = dict.fromkeys([*products, "copy"], float("inf"))
        for _ in range(tries):
            for name, run in [*products.items(), ("copy", lambda: dst.copy_(src))]:
                start = clock()
                run()
                best[name] = min(best[name], clock() - start)
    finally:
        torch.set_num_threads(before)
    rates = {name: round(2 * 1024**3 / max(best[name], 1e-9) / 1e9, 1) for name in products}
    return {
        "matmul_gflop_per_s": max(rates.values()),
        "copy_gb_per_s": round(2 * src.numel() * 4 / max(best["copy"], 1e-9) / 1e9, 1),
        **{f"matmul_{name}_gflop_per_s": rate for name, rate in rates.items()},
    }


def best_ceilings(*measured: dict) -> dict:
    """Each ceiling's best over measurements taken at different times of a run: a slow spell
    during one of them (a neighbour on the core's sibling, a frequency drop) would otherwise
    understate the machine's bound, and every row would seem closer to it than it is."""
    return {key: max(m[key] for m in measured) for key in measured[0]}


def time_interleaved(
    calls: dict[str, Callable[[], None]], setup: Callable[[], None], rounds: int, on_round: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of process CPU time of each call, per round; round r starts at the r-th call."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        first = r % len(names)
        for name in names[first:] + names[:first]:
            setup()
            start = time.process_time()
            calls[name]()
            times[name].append(time.process_time() - start)
        on_round()
    return times


def fill_speedups(rows: list[dict]) -> None:
    """speedup_vs_<baseline> = the baseline's min_ms / the row's, among rows of the same mode and
    T; None where the baseline was not timed."""
    mins = {(r["mode"], r["T"], r["implementation"]): r["min_ms"] for r in rows}
    for row in rows:
        for baseline in BASELINES:
            theirs = mins.get((row["mode"], row["T"], baseline))
            row[f"speedup_vs_{baseline}"] = round(theirs / row["min_ms"], 3) if theirs and row["min_ms"] > 0 else None


def measure_shape(mode: str, shape: dict, names: list[str], rounds: int, on_round: Callable[[], None]) -> list[dict]:
    """One row per implementation: forward+backward of `mode` at `shape`, timed as the module says
    (bound_ms comes with the run's ceilings, `fill_bounds`)."""
    B, T, S, H, Dh = (shape[k] for k in ("B", "T", "S", "H", "Dh"))
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T * S, 3 * H * Dh, generator=g).requires_grad_()
    grad = torch.randn(B, T * S, H * Dh, generator=g)

    def setup() -> None:
        qkv.grad = None

    def call(fn: Callable) -> Callable[[], None]:
        return lambda: fn(qkv, H, T, mode).backward(grad)

    calls = {name: call(attention_fn(name)) for name in names}
    for run in calls.values():  # untimed: one-off allocations, the C++ kernels' load
        setup()
        run()
    times = time_interleaved(calls, setup, rounds, on_round)
    flops = attention_flops(mode, shape, BACKWARD)
    moved = io_bytes(shape)
    rows = []
    for name in names:
        best = min(times[name])
        rows.append(
            {
                "mode": mode,
                "T": T,
                "shape": dict(shape),
                "implementation": name,
                "min_ms": round(best * 1e3, 3),
                "times_ms": [round(t * 1e3, 3) for t in times[name]],
                "flops": flops,
                "gflop_per_s": round(flops / best / 1e9, 2) if best > 0 else None,
                "io_bytes": moved,
                "io_gb_per_s": round(moved / best / 1e9, 2) if best > 0 else None,
            }
        )
    return rows


def fill_bounds(rows: list[dict], ceilings: dict) -> None:
    """Each row's bound_ms: the slower of its flops at the matmul rate and its bytes at the copy rate."""
    for row in rows:
        bound_s = max(
            row["flops"] / (ceilings["matmul_gflop_per_s"] * 1e9), row["io_bytes"] / (ceilings["copy_gb_per_s"] * 1e9)
        )
        row["bound_ms"] = round(bound_s * 1e3, 3)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _modes(text: str) -> list[str]:
    modes = [x for x in text.split(",") if x]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode {', '.join(unknown)} (modes: {', '.join(MODES)})")
    return modes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_ratios", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cpu_ratios.json"), help="the JSON written")
    parser.add_argument("--modes", type=_modes, default=["temporal", "split", "spatial", "joint"])
    parser.add_argument("--frames", type=_ints, default=[8, 16], help="T values, comma-separated")
    add_run_arguments(parser)
    parser.add_argument(
        "--implementations",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated (default: the plain baselines and every backend that runs here)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens-per-frame", type=int, default=196, help="S")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    return parse_run_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    load = LoadWatch.start("cpu_ratios", args.allow_loaded)
    if load is None:
        return 2
    base = dict(B=args.batch, S=args.tokens_per_frame, H=args.heads, Dh=args.head_dim)
    names = args.implementations or implementations(dict(base, T=args.frames[0]))
    measured = [measure_ceilings()]
    started = time.perf_counter()
    rows = []
    for mode in args.modes:
        for frames in args.frames:
            rows += measure_shape(mode, dict(base, T=frames), names, args.rounds, load.on_round)
    measured.append(measure_ceilings())
    ceilings = best_ceilings(*measured)
    fill_bounds(rows, ceilings)
    fill_speedups(rows)
    metadata = load.metadata()
    metadata.update(
        {
            "family": FAMILY,
            "method": METHOD,
            "pass": BACKWARD,
            "dtype": "float32",
            "rounds": args.rounds,
            "seconds": round(time.perf_counter() - started, 1),
            "ceilings": ceilings,
            "ceilings_measured": measured,
            "flop_formula": ATTENTION_FLOP_FORMULA,
            "io_formula": IO_FORMULA,
        }
    )
    for row in rows:
        row["loaded"] = metadata["loaded"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=1) + "\n")
    load.warn_if_loaded(metadata, args.out, args.allow_loaded)
    print("\n".join(render_file(args.out, allow_loaded=True)[FAMILY]))
    print(f"wrote {args.out} ({metadata['seconds']} s of measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
