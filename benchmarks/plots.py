"""Figures of a benchmark run, drawn beside its JSON (pytest-benchmark's --benchmark-json; `make bench`
writes runs/bench/bench.json and runs this).

    python -m benchmarks.plots runs/bench/bench.json     # writes the PNGs next to it, prints the memory table

memory.png            per target: activation memory kept for backward per clip, and the largest batch
                      whose training step fits the memory budget, per variant and implementation
step_time.png         per target: the training step's median time per variant and implementation
attention_frames.png  per target: forward+backward attention time per clip against the frame count T,
                      a panel per mode, a line per implementation

Rows come from each benchmark's extra_info (benchmarks/measure.py and benchmarks/test_memory.py fill
it); a figure whose rows are absent (a run with -k) is not drawn.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from vivit import VARIANTS
from vivit.memory_report import IMPLEMENTATIONS
from vivit_kernels.checks import MODES

from .core import BACKWARD
from .report import implementation_name

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # optional: `main` says how to install it
    plt = None

MIB = 2**20
SHORT = {
    "spatio_temporal": "1 spatio-temporal",
    "factorised_encoder": "2 fact. encoder",
    "factorised_self_attention": "3 fact. self-attn",
    "factorised_dot_product": "4 fact. dot-product",
}


def load_rows(path: str | Path) -> list[dict]:
    """Each benchmark's extra_info, with its median (seconds) where the conftest did not record one."""
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        row = dict(bench.get("extra_info", {}))
        if "op" not in row:
            continue
        row.setdefault("median_s", bench.get("stats", {}).get("median"))
        rows.append(row)
    return rows


def implementation(row: dict) -> str:
    return implementation_name(row["op"], row["backend"])


def shape_field(row: dict, name: str) -> int:
    """A field of the row's shape string ("B=1, T=16, S=196, ...")."""
    match = re.search(rf"\b{name}=(\d+)", row["shape"])
    if match is None:
        raise ValueError(f"shape {row['shape']!r} has no {name}")
    return int(match.group(1))


def _target(row: dict) -> str:
    return f"{row['device']}-{row['dtype']}"


def _memory_rows(rows: list[dict]) -> dict[str, dict[tuple[str, str], dict]]:
    """target -> (variant, implementation) -> row, for the memory case."""
    out: dict[str, dict[tuple[str, str], dict]] = {}
    for row in rows:
        if row["op"] == "memory":
            out.setdefault(_target(row), {})[row["case"], implementation(row)] = row
    return out


def _grouped_bars(ax, table: dict[tuple[str, str], dict], value, ylabel: str, label=None) -> None:
    """Bars per variant (groups) and implementation (colours); `value(row)` gives the height (or None)."""
    variants = [v for v in VARIANTS if any(key[0] == v for key in table)]
    impls = [i for i in IMPLEMENTATIONS if any(key[1] == i for key in table)]
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs, heights, texts = [], [], []
        for i, variant in enumerate(variants):
            row = table.get((variant, impl))
            height = None if row is None else value(row)
            if height is not None:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                heights.append(height)
                texts.append(label(row) if label else None)
        bars = ax.bar(xs, heights, width, label=impl)
        if label:
            ax.bar_label(bars, texts, fontsize=6, padding=1)
    ax.set_xticks(range(len(variants)), [SHORT[v] for v in variants], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _largest_batch_label(row: dict) -> str:
    batch = row["largest_batch"]
    return f">={batch}" if batch == row.get("batch_limit") else str(batch)


def _title(row: dict, target: str) -> str:
    frames, size = shape_field(row, "num_frames"), shape_field(row, "img_size")
    return f"ViViT-B, {frames} x {size} x {size} clips, {target}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_memory(rows: list[dict], out: Path) -> Path | None:
    tables = _memory_rows(rows)
    if not tables:
        return None
    fig, axes = plt.subplots(len(tables), 2, figsize=(13, 4.2 * len(tables)), squeeze=False)
    for (target, table), (left, right) in zip(sorted(tables.items()), axes):
        first = next(iter(table.values()))
        _grouped_bars(
            left,
            table,
            lambda r: r.get("activation_bytes_per_clip", 0) / MIB,
            "MiB per clip kept for backward",
            lambda r: f"{r['activation_bytes_per_clip'] / MIB:.0f}",
        )
        left.set_title(f"Activation memory per clip: {_title(first, target)}", fontsize=9)
        _grouped_bars(right, table, lambda r: r.get("largest_batch"), "clips", _largest_batch_label)
        right.set_title(
            f"Largest batch whose step fits {first['budget_bytes'] / 2**30:.1f} GiB (>= : the search's limit)",
            fontsize=9,
        )
        left.legend(fontsize=7)
    return _save(fig, out / "memory.png")


def plot_step_time(rows: list[dict], out: Path) -> Path | None:
    tables = _memory_rows(rows)
    if not tables:
        return None
    fig, axes = plt.subplots(len(tables), 1, figsize=(8, 4.2 * len(tables)), squeeze=False)
    for (target, table), (ax,) in zip(sorted(tables.items()), axes):
        first = next(iter(table.values()))
        _grouped_bars(
            ax, table, lambda r: r["median_s"] * 1e3, "ms per step (median)", lambda r: f"{r['median_s'] * 1e3:.0f}"
        )
        ax.set_title(
            f"Training step (fwd+bwd+AdamW), batch {shape_field(first, 'B')}: {_title(first, target)}", fontsize=9
        )
        ax.legend(fontsize=7)
    return _save(fig, out / "step_time.png")


def plot_attention_frames(rows: list[dict], out: Path) -> Path | None:
    """Forward+backward time per clip (median / B) against T, at the ViViT-B frame (S=196, 12 x 64)."""
    series: dict[str, dict[str, dict[str, list[tuple[int, float]]]]] = {}
    for row in rows:
        if row["op"] != "attention" or row["pass"] != BACKWARD or shape_field(row, "S") != 196:
            continue
        per_clip = row["median_s"] / shape_field(row, "B")
        series.setdefault(_target(row), {}).setdefault(row["case"], {}).setdefault(implementation(row), []).append(
            (shape_field(row, "T"), per_clip)
        )
    if not series:
        return None
    fig, axes = plt.subplots(len(series), len(MODES), figsize=(4 * len(MODES), 3.6 * len(series)), squeeze=False)
    for (target, modes), row_axes in zip(sorted(series.items()), axes):
        frames = sorted({t for lines in modes.values() for points in lines.values() for t, _ in points})
        for mode, ax in zip(MODES, row_axes):
            for impl, points in sorted(
                modes.get(mode, {}).items(), key=lambda kv: (not kv[0].endswith("einsum"), kv[0])
            ):
                points.sort()
                ax.plot([t for t, _ in points], [s * 1e3 for _, s in points], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(frames, [str(t) for t in frames])
            ax.set_title(f"{mode}, {target}", fontsize=9)
            ax.set_xlabel("frames T (196 tokens each)")
            ax.set_ylabel("ms per clip, fwd+bwd")
            ax.grid(alpha=0.3, which="both")
            if modes.get(mode):
                ax.legend(fontsize=7)
            else:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, out / "attention_frames.png")


def memory_table(rows: list[dict]) -> list[str]:
    """A markdown table of the memory case: per target, variant and implementation."""
    lines = []
    for target, table in sorted(_memory_rows(rows).items()):
        first = next(iter(table.values()))
        lines += [
            f"Memory case, {_title(first, target)}, budget {first['budget_bytes'] / 2**30:.1f} GiB",
            "| model | implementation | kept per clip | vs einsum | D-wide tensors / token / block | step (median) "
            "| largest batch | step peak at batch 1 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            einsum = table.get((variant, "einsum"))
            for impl in IMPLEMENTATIONS:
                row = table.get((variant, impl))
                if row is None:
                    continue
                kept = row["activation_bytes_per_clip"]
                ratio = f"{einsum['activation_bytes_per_clip'] / kept:.2f}x" if einsum else "-"
                peak = row["step_peak_bytes_by_batch"].get("1")
                lines.append(
                    f"| {SHORT[variant]} | {impl} | {kept / MIB:.1f} MiB | {ratio} | "
                    f"{row['tensors_per_token_per_block']:.2f} | {row['median_s'] * 1e3:.0f} ms | "
                    f"{_largest_batch_label(row)} | " + ("-" if peak is None else f"{peak / MIB:.0f} MiB") + " |"
                )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.split("\n")[0])
    parser.add_argument("json", help="pytest-benchmark's --benchmark-json output")
    parser.add_argument("--out", help="folder for the PNGs (default: the JSON's)")
    args = parser.parse_args(argv)
    if plt is None:
        raise SystemExit(f"{parser.prog}: drawing the figures needs matplotlib: pip install matplotlib")
    rows = load_rows(args.json)
    out = Path(args.out or Path(args.json).parent)
    out.mkdir(parents=True, exist_ok=True)
    for line in memory_table(rows):
        print(line)
    drawn = [p for p in (plot_memory(rows, out), plot_step_time(rows, out), plot_attention_frames(rows, out)) if p]
    print(
        "wrote " + (", ".join(map(str, drawn)) if drawn else f"no figure: {args.json} has no memory or attention rows")
    )


if __name__ == "__main__":
    main()
