"""Converted models' CPU training-step time, measured as benchmarks/cpu_ratios.py measures attention.

    python -m benchmarks.cpu_dropin --out docs/results/cpu_dropin.json [--families timm_vit,videomae]
        [--rounds 7] [--size small|smoke] [--allow-loaded]
    python -m benchmarks.report docs/results/cpu_dropin.json     # the markdown tables

Each family of benchmarks/dropin.py whose library is installed is built at its CPU size as
benchmarks/dropin.py builds it ("original"), and deep copies of it are converted with
`vivit_kernels.convert(..., backend="auto")` ("converted") and with memory="lean"
("converted_lean"; where convert refuses lean, the row records the refusal). Before anything is
timed, each converted model's logits and first-layer gradient are checked against the original's
in fp32. The step is benchmarks/dropin.py's: the cross-entropy of the logits, its backward and an
AdamW update (zero_grad untimed before it), timed at one thread by the process's CPU time, the
implementations taking turns within each round (the first rotating), each keeping its minimum
over the rounds (cpu_ratios.time_interleaved). The step's FLOPs are counted once per family by
FlopCounterMode over one converted step (the original's CPU SDPA calls have no FLOP formula in
torch, the library's ops do) and divide every implementation's time.

Auto per shape: every distinct attention call the converted model makes in a forward (recorded
where the backend registry selects a backend), the backend "auto" picks for it, and that call's
forward+backward (random packed qkv leaf, dense output gradient) under the pick and under "sdpa",
timed the same way.

A run refuses to start at a 1-min load average at or above the core count unless --allow-loaded,
and is marked "loaded" when the load reaches the core count at any round.

JSON: {"metadata": benchmarks.provenance.run_metadata() plus "family", "method", "dtype", "rounds",
"size", "ceilings" (the better of the one-thread rates measured at the run's start and end:
"ceilings_measured"), "flop_formula", "targets", "skipped" (family -> why not run)}, "rows", one per
(family, implementation): family, implementation, shape, parameters, refused (convert's message, or
None), min_ms, times_ms, flops, gflop_per_s, ceiling_fraction (of the one-thread matmul rate),
speedup_vs_original (original_ms / min_ms), time_vs_original (min_ms / original_ms), loaded; and
"shapes", one per (family, attention call): family, op, mode, B, T, S, prefix, H, Dh, layout,
calls (per forward), backend (auto's pick), auto_ms, sdpa_ms, auto_times_ms, sdpa_times_ms,
flops, speedup_vs_sdpa (sdpa_ms / auto_ms), loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

import vivit_kernels
from vivit_kernels import backends
from vivit_kernels.checks import AttentionShape

from .core import check_matches, train_step_case
from .cpu_ratios import best_ceilings, measure_ceilings, time_interleaved
from .dropin import (
    CLASSES,
    CONVERTED,
    DROPIN_SHAPES,
    DROPIN_SMOKE,
    FAMILIES,
    ORIGINAL,
    _patch_embedding_weight,
    dropin_model,
    dropin_skip_reason,
)
from .provenance import LoadWatch, add_run_arguments, parse_run_arguments
from .report import render

FAMILY = "cpu_dropin"
LEAN = "converted_lean"
IMPLEMENTATIONS = (ORIGINAL, CONVERTED, LEAN)
ATTENTION_OPS = ("attention", "attention_packed")
SIZES = ("small", "smoke")  # benchmarks/dropin.py's CPU shapes, or its smoke shape
TOLERANCE = 1e-4  # benchmarks.dropin.check_against_original's: a right conversion is off by ~1e-6
TARGETS = {"lean_time_vs_original_max": 1.10, "auto_speedup_vs_sdpa_min": 1.0}
METHOD = (
    "one training step (cross-entropy, backward, AdamW; zero_grad untimed), fp32, 1 thread, process CPU time "
    "per step, min over interleaved rounds (first implementation rotated); per attention call: forward+backward "
    "from a packed qkv leaf with a dense output gradient, timed the same way"
)
FLOP_FORMULA = (
    "FlopCounterMode over one converted step (attention by the library's formula: forward 4*B*H*N*L*Dh, "
    "backward 2.5x forward), the same count dividing every implementation's time"
)


@contextlib.contextmanager
def recorded_attention_calls() -> Iterator[dict[tuple[str, AttentionShape], list]]:
    """{(op, shape): [backend picked, calls]} of the attention calls made inside, as the registry
    sees them (the module's own hooks would miss lean blocks, which call `attend` directly)."""
    calls: dict[tuple[str, AttentionShape], list] = {}
    select = backends.select

    def recording(request: backends.Request, backend: str = "auto") -> backends.Selected:
        selected = select(request, backend)
        if request.op in ATTENTION_OPS:
            calls.setdefault((request.op, request.shape), [selected.name, 0])[1] += 1
        return selected

    with mock.patch.object(backends, "select", recording):
        yield calls


def build(family: str, size: str) -> tuple[dict[str, torch.nn.Module], dict[str, str], torch.Tensor, Callable]:
    """({implementation: model}, {implementation: convert's refusal}, inputs, (model, inputs) -> logits)."""
    shape = dict(DROPIN_SMOKE) if size == "smoke" else DROPIN_SHAPES["cpu"][family]
    cpu = torch.device("cpu")
    original, inputs, logits = dropin_model(dict(variant=family, shape=shape, backend=ORIGINAL), cpu)
    options = FAMILIES[family][1]
    models, refused = {ORIGINAL: original}, {}
    for name, memory in ((CONVERTED, None), (LEAN, "lean")):
        try:
            models[name] = vivit_kernels.convert(copy.deepcopy(original), backend="auto", memory=memory, **options)
        except ValueError as error:
            refused[name] = str(error)
    return models, refused, inputs, logits


def check_and_record(
    family: str, models: dict[str, torch.nn.Module], inputs: torch.Tensor, logits: Callable
) -> dict[tuple[str, AttentionShape], list]:
    """AssertionError unless every converted model's logits and first-layer gradient match the
    original's (fp32); returns the attention calls of the converted model's forward."""
    results, calls = {}, {}
    for name, model in models.items():
        with recorded_attention_calls() as recorded:
            out = logits(model.train(), inputs)
        if name == CONVERTED:
            calls = recorded
        out.square().mean().backward()
        results[name] = (out.detach(), _patch_embedding_weight(model).grad)
    for name in models:
        if name != ORIGINAL:
            pairs = zip(("logits", "patch embedding gradient"), results[ORIGINAL], results[name])
            check_matches(f"cpu_dropin {family}: {name}", "the original's", pairs, TOLERANCE)
    return calls


def measure_steps(
    family: str, size: str, rounds: int, on_round: Callable[[], None]
) -> tuple[list[dict], dict[tuple[str, AttentionShape], list]]:
    """One row per implementation of `family` (timed, or refused by convert), and the converted
    model's attention calls (ceiling_fraction comes with the run's ceilings, `fill_ceiling_fractions`)."""
    models, refused, inputs, logits = build(family, size)
    calls = check_and_record(family, models, inputs, logits)
    labels = torch.randint(0, CLASSES, (inputs.shape[0],), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    cases = {
        name: train_step_case(model, lambda m=model: logits(m, inputs), labels, cpu, torch.float32)
        for name, model in models.items()
    }
    flops = None
    for name, case in cases.items():  # untimed: AdamW's state, one-off allocations, the C++ kernels' load
        case.setup()
        if name == CONVERTED:
            with FlopCounterMode(display=False) as counter:
                case.run()
            flops = float(counter.get_total_flops())
        else:
            case.run()

    def setup() -> None:
        for case in cases.values():
            case.setup()

    times = time_interleaved({name: case.run for name, case in cases.items()}, setup, rounds, on_round)
    mins = {name: min(t) for name, t in times.items()}
    rows = []
    for name in IMPLEMENTATIONS:
        row = {
            "family": family,
            "implementation": name,
            "shape": dict(DROPIN_SMOKE) if size == "smoke" else DROPIN_SHAPES["cpu"][family],
            "parameters": cases[name].info["parameters"] if name in cases else None,
            "refused": refused.get(name),
            "min_ms": None,
            "times_ms": [],
            "flops": flops,
            "gflop_per_s": None,
            "ceiling_fraction": None,
            "speedup_vs_original": None,
            "time_vs_original": None,
        }
        best = mins.get(name)
        if best is not None:
            row.update(min_ms=round(best * 1e3, 3), times_ms=[round(t * 1e3, 3) for t in times[name]])
        if best and mins[ORIGINAL]:
            row["speedup_vs_original"] = round(mins[ORIGINAL] / best, 3)
            row["time_vs_original"] = round(best / mins[ORIGINAL], 3)
            if flops:
                row["gflop_per_s"] = round(flops / best / 1e9, 2)
        rows.append(row)
    return rows, calls


def fill_ceiling_fractions(rows: list[dict], ceilings: dict) -> None:
    """Each timed row's rate as a fraction of the one-thread matmul ceiling."""
    for row in rows:
        if row["gflop_per_s"] is not None:
            row["ceiling_fraction"] = round(
                row["flops"] / (row["min_ms"] / 1e3) / (ceilings["matmul_gflop_per_s"] * 1e9), 3
            )


def attention_runs(op: str, shape: AttentionShape, names: list[str]) -> tuple[Callable[[], None], dict]:
    """(setup, {backend: forward+backward of the call}) on one random packed qkv leaf of `shape`."""
    B, H, N, Dh = shape.batch, shape.heads, shape.tokens, shape.head_dim
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3 * H * Dh, generator=g).requires_grad_()
    packed = op == "attention_packed"
    grad = torch.randn(B, N, H * Dh, generator=g) if packed else torch.randn(B, H, N, Dh, generator=g)
    grid = (shape.frames, shape.mode, shape.scale)

    def run(backend: str) -> Callable[[], None]:
        options = dict(num_prefix_tokens=shape.prefix, layout=shape.layout, dropout_p=shape.dropout_p, backend=backend)

        def call() -> None:
            if packed:
                out = vivit_kernels.factorised_attention_packed(qkv, H, *grid, **options)
            else:  # q, k, v as a layer with qk_norm passes them: views of its packed projection
                q, k, v = qkv.view(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4).unbind(0)
                out = vivit_kernels.factorised_attention(q, k, v, *grid, **options)
            out.backward(grad)

        return call

    def setup() -> None:
        qkv.grad = None

    return setup, {name: run(name) for name in names}


def measure_attention_calls(
    family: str, calls: dict[tuple[str, AttentionShape], list], rounds: int, on_round: Callable[[], None]
) -> list[dict]:
    """One row per attention call: forward+backward under auto's pick against "sdpa"."""
    rows = []
    for (op, shape), (picked, count) in calls.items():
        # Where auto picks sdpa itself the two are one measurement: ratio 1.
        names = list(dict.fromkeys([picked, "sdpa"]))
        setup, runs = attention_runs(op, shape, names)
        for run in runs.values():  # untimed: one-off allocations
            setup()
            run()
        times = time_interleaved(runs, setup, rounds, on_round)
        auto, sdpa = min(times[picked]), min(times["sdpa"])
        rows.append(
            {
                "family": family,
                "op": op,
                "mode": shape.mode,
                "B": shape.batch,
                "T": shape.frames,
                "S": shape.tokens_per_frame,
                "prefix": shape.prefix,
                "H": shape.heads,
                "Dh": shape.head_dim,
                "layout": shape.layout,
                "calls": count,
                "backend": picked,
                "auto_ms": round(auto * 1e3, 3),
                "sdpa_ms": round(sdpa * 1e3, 3),
                "auto_times_ms": [round(t * 1e3, 3) for t in times[picked]],
                "sdpa_times_ms": [round(t * 1e3, 3) for t in times["sdpa"]],
                "flops": shape.forward_flops + shape.backward_flops,
                "speedup_vs_sdpa": round(sdpa / auto, 3) if auto > 0 else None,
            }
        )
    return rows


def _families(text: str) -> list[str]:
    families = [x for x in text.split(",") if x]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        what = f"unknown family {', '.join(unknown)}" if unknown else "no family given"
        raise argparse.ArgumentTypeError(f"{what} (families: {', '.join(FAMILIES)})")
    return families


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_dropin", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/cpu_dropin.json"), help="the JSON written")
    parser.add_argument("--families", type=_families, default=list(FAMILIES), help="comma-separated")
    add_run_arguments(parser)
    parser.add_argument(
        "--size", choices=SIZES, default="small", help="benchmarks/dropin.py's CPU shapes, or its smoke shape"
    )
    return parse_run_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    torch.set_num_threads(1)
    args = parse_args(argv)
    load = LoadWatch.start(FAMILY, args.allow_loaded)
    if load is None:
        return 2
    measured = [measure_ceilings()]
    started = time.perf_counter()
    rows, shapes, skipped = [], [], {}
    for family in args.families:
        reason = dropin_skip_reason({"variant": family})
        if reason:
            skipped[family] = reason
            print(f"cpu_dropin: skipped {reason}", file=sys.stderr)
            continue
        family_rows, calls = measure_steps(family, args.size, args.rounds, load.on_round)
        rows += family_rows
        shapes += measure_attention_calls(family, calls, args.rounds, load.on_round)
        print(f"cpu_dropin: {family} measured ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if not rows:
        print(f"cpu_dropin: nothing measured: {'; '.join(skipped.values())}", file=sys.stderr)
        return 2
    measured.append(measure_ceilings())
    ceilings = best_ceilings(*measured)
    fill_ceiling_fractions(rows, ceilings)
    metadata = load.metadata()
    metadata.update(
        {
            "family": FAMILY,
            "method": METHOD,
            "dtype": "float32",
            "rounds": args.rounds,
            "size": args.size,
            "seconds": round(time.perf_counter() - started, 1),
            "ceilings": ceilings,
            "ceilings_measured": measured,
            "flop_formula": FLOP_FORMULA,
            "targets": TARGETS,
            "skipped": skipped,
        }
    )
    for row in rows + shapes:
        row["loaded"] = metadata["loaded"]
    data = {"metadata": metadata, "rows": rows, "shapes": shapes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    load.warn_if_loaded(metadata, args.out, args.allow_loaded)
    print("\n".join(render(data, str(args.out), allow_loaded=True)[FAMILY]))
    print(f"wrote {args.out} ({metadata['seconds']} s of measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
