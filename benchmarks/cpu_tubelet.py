"""The tubelet embedding's CPU ratios, measured as benchmarks/cpu_ratios.py measures attention's.

    python -m benchmarks.cpu_tubelet --out runs/bench/cpu_tubelet.json [--rounds 7] [--allow-loaded]

ViViT-B's tokeniser (1 x 3 x 16 x 224 x 224 fp32, 2 x 16 x 16 tubelets, D = 768, with bias and a
positional embedding) in three passes: the forward (no autograd), forward+backward to the weight,
bias and positional embedding (the video is data), and the same with the video's gradient too (a
tokeniser behind a learned front end; Conv3d's slow path). Each implementation, the baselines
(the einsum of the "reference" backend, nn.Conv3d's functional form and unfold+matmul from
benchmarks/tubelet.py), then every other registry backend that runs fp32 on the CPU, is timed at
one thread by the process's CPU time per call, the implementations taking turns within each
round (the first one rotating) and each keeping its minimum over the rounds. A row's speedup is
the fastest baseline's minimum over its own.

A run refuses to start at a 1-min load average at or above the core count unless --allow-loaded,
and is marked "loaded" when the load reaches the core count at any round.

JSON: {"metadata": benchmarks.provenance.run_metadata() plus "family", "method", "dtype",
"rounds", "shape", "ceilings" (one-thread matmul GFLOP/s and copy GB/s, the better of the
measurements at the run's start and end: `ceilings_measured`), "flop_formula"}, and "rows", one
per (pass, implementation): pass, implementation, min_ms, times_ms (every round), flops,
gflop_per_s, bound_ms (flops at the matmul rate), best_baseline, speedup_vs_best_baseline, loaded.
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

from .core import BASELINE, FORWARD, registry_skip_reason
from .cpu_ratios import best_ceilings, measure_ceilings, time_interleaved
from .provenance import LoadWatch, add_run_arguments, parse_run_arguments
from .report import tubelet_table
from .tubelet import TUBELET_SHAPES, tubelet_fn, tubelet_shape

FAMILY = "cpu_tubelet"
BASELINES = (BASELINE, "conv3d", "unfold_matmul")
WEIGHT_GRADS, ALL_GRADS = "forward+backward (weight, bias, pos_embed)", "forward+backward (and video)"
PASSES = (FORWARD, WEIGHT_GRADS, ALL_GRADS)
METHOD = (
    "fp32, 1 thread, process CPU time per call, min over interleaved rounds (first implementation rotated); "
    "backward with a dense output gradient"
)
FLOP_FORMULA = "forward 2*tokens*D*C*t*h*w; each of the weight and the video gradients 1x forward"


def implementations(shape: dict) -> list[str]:
    """The baselines, then every other registry backend that runs this fp32 CPU call when named."""
    cpu, request = torch.device("cpu"), tubelet_shape(shape)
    others = [
        name
        for name in backends.names()
        if name not in BASELINES and registry_skip_reason("tubelet", name, cpu, torch.float32, request) is None
    ]
    return [*BASELINES, *others]


def pass_flops(shape: dict, pass_name: str) -> float:
    """FLOP_FORMULA: the forward, plus one product per gradient (weight; weight and video)."""
    return tubelet_shape(shape).flops * (1 + PASSES.index(pass_name))


def measure_pass(
    pass_name: str, shape: dict, names: list[str], rounds: int, on_round: Callable[[], None]
) -> list[dict]:
    """One row per implementation: `pass_name` at `shape`, timed as the module says."""
    B, C, T, H, W, D = (shape[k] for k in ("B", "C", "T", "H", "W", "D"))
    tubelet = (shape["t"], shape["h"], shape["w"])
    nt, S = T // tubelet[0], (H // tubelet[1]) * (W // tubelet[2])
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, C, T, H, W, generator=g)
    params = [torch.randn(D, C, *tubelet, generator=g) * 0.02, torch.randn(D, generator=g), torch.randn(nt, S, D)]
    grad = torch.randn(B, nt, S, D, generator=g)
    leaves = [video.requires_grad_(pass_name == ALL_GRADS), *(p.requires_grad_(pass_name != FORWARD) for p in params)]

    def setup() -> None:
        for x in leaves:
            x.grad = None

    def call(fn: Callable) -> Callable[[], None]:
        def run() -> None:
            if pass_name == FORWARD:
                with torch.no_grad():
                    fn(*leaves, tubelet)
            else:
                fn(*leaves, tubelet).backward(grad)

        return run

    calls = {name: call(tubelet_fn(name)) for name in names}
    for run in calls.values():  # untimed: one-off allocations, the C++ kernels' load
        setup()
        run()
    times = time_interleaved(calls, setup, rounds, on_round)
    flops = pass_flops(shape, pass_name)
    mins = {name: min(times[name]) for name in names}
    best_baseline = min((n for n in names if n in BASELINES), key=mins.__getitem__)
    return [
        {
            "pass": pass_name,
            "implementation": name,
            "min_ms": round(mins[name] * 1e3, 3),
            "times_ms": [round(t * 1e3, 3) for t in times[name]],
            "flops": flops,
            "gflop_per_s": round(flops / mins[name] / 1e9, 2) if mins[name] > 0 else None,
            "best_baseline": best_baseline,
            "speedup_vs_best_baseline": round(mins[best_baseline] / mins[name], 3) if mins[name] > 0 else None,
        }
        for name in names
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_tubelet", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cpu_tubelet.json"), help="the JSON written")
    add_run_arguments(parser)
    parser.add_argument(
        "--implementations",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="comma-separated (default: the baselines and every backend that runs here)",
    )
    return parse_run_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    load = LoadWatch.start(FAMILY, args.allow_loaded)
    if load is None:
        return 2
    shape = TUBELET_SHAPES["vivit_b"]["cpu"]
    names = args.implementations or implementations(shape)
    measured = [measure_ceilings()]
    started = time.perf_counter()
    rows = [row for pass_name in PASSES for row in measure_pass(pass_name, shape, names, args.rounds, load.on_round)]
    measured.append(measure_ceilings())
    ceilings = best_ceilings(*measured)
    for row in rows:  # flops at the matmul rate
        row["bound_ms"] = round(row["flops"] / (ceilings["matmul_gflop_per_s"] * 1e9) * 1e3, 3)
    metadata = load.metadata()
    metadata.update(
        {
            "family": FAMILY,
            "method": METHOD,
            "dtype": "float32",
            "rounds": args.rounds,
            "shape": shape,
            "seconds": round(time.perf_counter() - started, 1),
            "ceilings": ceilings,
            "ceilings_measured": measured,
            "flop_formula": FLOP_FORMULA,
        }
    )
    for row in rows:
        row["loaded"] = metadata["loaded"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"metadata": metadata, "rows": rows}, indent=1) + "\n")
    loads = f"load {metadata['load_average_start']} at start, {metadata['load_average_end']} at end"
    print(f"{'Loaded run' if metadata['loaded'] else 'Run'}: {loads}; {ceilings}")
    print("\n".join(tubelet_table(rows)))
    print(f"wrote {args.out} ({metadata['seconds']} s of measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
