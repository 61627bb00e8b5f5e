"""Markdown tables of benchmark runs, each under a line saying where, how and from what it was measured.

    python -m benchmarks.report FILE.json [FILE2.json ...]                 # print every table
    python -m benchmarks.report FILE.json --update docs/benchmarks.md      # rewrite the marked tables
    python -m benchmarks.report FILE.json --check docs/benchmarks.md README.md   # exit 1 where they differ

Inputs: the JSON of `python -m benchmarks.cpu_ratios` (families "cpu_attention": every row, and
"headline": the fused backends against the plain baselines), of `python -m benchmarks.cpu_tubelet`
("cpu_tubelet") and `python -m benchmarks.cpu_dropin` ("cpu_dropin": the converted models' step
times, then auto's backend per attention call against sdpa), and pytest-benchmark's
--benchmark-json (`make bench`: a family per op and device, "bench_attention_cpu",
"bench_loader_cpu", ...). In a markdown file a family's table lies between the lines
`<!-- bench:FAMILY -->` and `<!-- /bench:FAMILY -->`: --update replaces what is between them,
--check compares it, so published tables are generated, never typed.

A run whose 1-min load average reached its core count, or that recorded no load, is refused
unless --allow-loaded, and is then marked in each of its tables: a loaded neighbour slows
memory-bound code more than compute-bound code, so its ratios are biased. A run with a row
faster than its bound (ceilings measured in a slow spell) is refused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .core import BASELINE, PLAIN_EINSUM, PLAIN_SDPA, TORCH_BASELINES, UNFUSED_ATTENTION, einsum_baseline
from .loader import OLD as LOADER_OLD
from .loader import OLD_DECODE as LOADER_OLD_DECODE

MARKER = re.compile(r"<!-- bench:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)
NAMES = {PLAIN_EINSUM: "plain einsum", PLAIN_SDPA: "plain SDPA"}


class Refused(ValueError):
    """A run that must not be published as it is (taken under load, or its load unknown)."""


# ------------------------------------------------------------------------------------ formatting


def markdown(header: tuple, lines: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in lines]
    return out


def _bytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _ms(ms: float) -> str:
    """One decimal from 1 ms up, three below (tiny shapes)."""
    return _time(ms / 1e3) if ms >= 1 else f"{ms:.3f} ms"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def implementation_name(op: str, backend: str) -> str:
    """How a table names an implementation: the library's "reference" is the einsum baseline of
    every op but attention, which has the plain baselines."""
    if backend == BASELINE and op != "attention":
        return "einsum"
    return NAMES.get(backend, backend)


def _order(op: str, backend: str) -> int:
    """Baselines first (einsum, then torch's), then the library's unfused backends, then the rest."""
    if backend == einsum_baseline(op):
        return 0
    if backend == TORCH_BASELINES.get(op):
        return 1
    return 2 if backend in (*UNFUSED_ATTENTION, "unfold_matmul") else 3


def format_table(rows: list[dict]) -> list[str]:
    """The pytest-benchmark rows (benchmarks/measure.py's extra_info): one line per result,
    grouped by op, shape, device/dtype and pass, baselines first."""
    header = (
        "op / mode",
        "shape",
        "target",
        "backend",
        "pass",
        "median",
        "GFLOP/s",
        "GB/s",
        "of bound",
        "vs einsum",
        "vs SDPA/Conv3d",
        "peak mem",
        "saved for bwd",
    )
    ops = {"attention": 0, "tubelet": 1, "training": 2}

    def key(r: dict) -> tuple:
        group = (r["op"], r["case"], r["pass"], r["device"], r["dtype"], r["shape_name"])
        return ops.get(r["op"], 3), group, _order(r["op"], r["backend"]), r["backend"]

    lines = []
    for r in sorted(rows, key=key):
        rate = r.get("flop_per_s")
        lines.append(
            (
                r["case"] if r["op"] in ("attention", r["case"]) else f"{r['op']}: {r['case']}",
                r["shape_name"],
                f"{r['device']} {r['dtype']}",
                implementation_name(r["op"], r["backend"]),
                "fwd+bwd" if r["pass"] == "forward+backward" else r["pass"].replace("forward", "fwd"),
                _time(r["median_s"]),
                "-" if rate is None else f"{rate / 1e9:.1f}",
                "-" if r.get("byte_per_s") is None else f"{r['byte_per_s'] / 1e9:.1f}",
                "-" if r.get("bound_fraction") is None else f"{r['bound_fraction']:.0%}",
                _ratio(r.get("speedup_vs_einsum")),
                _ratio(r.get("speedup_vs_torch")),
                _bytes(r["peak_bytes"]),
                _bytes(r["saved_for_backward_bytes"]) if r["pass"] != "forward" else "-",
            )
        )
    return markdown(header, lines)


def format_loader_table(rows: list[dict]) -> list[str]:
    """The loader rows: one per file and path, the old path first."""
    header = (
        "file",
        "path",
        "video frames",
        "median / clip",
        "clips/s per worker",
        "vs old",
        "vs old decode",
        "peak mem per worker",
    )
    order = {LOADER_OLD: 0, LOADER_OLD_DECODE: 1}
    rows = sorted((r for r in rows if r["op"] == "loader"), key=lambda r: (r["shape_name"], order.get(r["backend"], 2)))
    lines = [
        (
            r["shape_name"],
            r["backend"],
            str(r["video_frames"]),
            _time(r["median_s"]),
            f"{r['clips_per_s']:.2f}",
            "-" if r.get("speedup_vs_old") is None else f"{r['speedup_vs_old']:.1f}x",
            "-" if r.get("speedup_vs_old_decode") is None else f"{r['speedup_vs_old_decode']:.1f}x",
            _bytes(r["peak_bytes"]),
        )
        for r in rows
    ]
    return markdown(header, lines) if lines else []


def _sorted_ratio_rows(rows: list[dict]) -> list[dict]:
    modes = list(dict.fromkeys(r["mode"] for r in rows))  # the order the run measured them in
    return sorted(
        rows,
        key=lambda r: (modes.index(r["mode"]), r["T"], _order("attention", r["implementation"]), r["implementation"]),
    )


def _of_bound(row: dict) -> str:
    """The fraction of the machine's bound a row reaches: its bound time over its time."""
    return f"{row['bound_ms'] / row['min_ms']:.0%}"


def ratio_table(rows: list[dict]) -> list[str]:
    """cpu_ratios rows: every implementation of each (mode, T), its minimum, rates, bound and ratios."""
    header = (
        "mode",
        "T",
        "implementation",
        "min",
        "GFLOP/s",
        "GB/s",
        "bound",
        "of bound",
        "vs plain einsum",
        "vs plain SDPA",
    )
    lines = [
        (
            r["mode"],
            str(r["T"]),
            implementation_name("attention", r["implementation"]),
            _ms(r["min_ms"]),
            f"{r['gflop_per_s']:.1f}",
            f"{r['io_gb_per_s']:.1f}",
            _ms(r["bound_ms"]),
            _of_bound(r),
            _ratio(r.get(f"speedup_vs_{PLAIN_EINSUM}")),
            _ratio(r.get(f"speedup_vs_{PLAIN_SDPA}")),
        )
        for r in _sorted_ratio_rows(rows)
    ]
    return markdown(header, lines)


def tubelet_table(rows: list[dict]) -> list[str]:
    """benchmarks.cpu_tubelet's rows: each pass's implementations against the fastest baseline."""
    return markdown(
        ("pass", "implementation", "min", "GFLOP/s", "bound", "of bound", "vs fastest baseline"),
        [
            (
                r["pass"],
                r["implementation"],
                _ms(r["min_ms"]),
                f"{r['gflop_per_s']:.1f}",
                _ms(r["bound_ms"]),
                _of_bound(r),
                f"{_ratio(r['speedup_vs_best_baseline'])} ({r['best_baseline']})",
            )
            for r in rows
        ],
    )


def dropin_table(rows: list[dict]) -> list[str]:
    """benchmarks.cpu_dropin's rows: a family's step time as built, converted and converted lean."""
    families: dict[str, dict[str, dict]] = {}
    for r in rows:
        families.setdefault(r["family"], {})[r["implementation"]] = r

    def step(r: dict | None) -> str:
        if r is None:
            return "-"
        return "refused" if r.get("refused") else _ms(r["min_ms"])

    lines = []
    for family, impls in families.items():
        original, converted, lean = (impls.get(name) for name in ("original", "converted", "converted_lean"))
        rate = converted and converted.get("gflop_per_s")
        lines.append(
            (
                family,
                step(original),
                step(converted),
                _ratio(converted and converted.get("speedup_vs_original")),
                step(lean),
                _ratio(lean and lean.get("time_vs_original")),
                "-" if rate is None else f"{rate:.1f} ({converted['ceiling_fraction']:.0%})",
            )
        )
    header = (
        "family",
        "original",
        "converted",
        "converted speed vs original",
        "converted, lean",
        "lean time / original",
        "converted GFLOP/s (of matmul ceiling)",
    )
    return markdown(header, lines)


def dropin_shapes_table(shapes: list[dict]) -> list[str]:
    """benchmarks.cpu_dropin's attention calls: auto's pick against sdpa on each shape."""
    header = ("family", "mode", "B", "T", "S", "prefix", "H", "Dh", "layout", "calls", "auto picks")
    header += ("auto", "sdpa", "auto speed vs sdpa")
    lines = [
        (
            s["family"],
            s["mode"],
            *(str(s[k]) for k in ("B", "T", "S", "prefix", "H", "Dh")),
            s["layout"].removesuffix("_major") + "-major",
            str(s["calls"]),
            s["backend"],
            _ms(s["auto_ms"]),
            _ms(s["sdpa_ms"]),
            _ratio(s["speedup_vs_sdpa"]),
        )
        for s in shapes
    ]
    return markdown(header, lines) if lines else []


def headline_table(rows: list[dict]) -> list[str]:
    """cpu_ratios rows: each fused implementation of each (mode, T) beside the plain baselines."""
    mins = {(r["mode"], r["T"], r["implementation"]): r["min_ms"] for r in rows}
    header = ("mode", "T", "fused", "time", "plain einsum", "plain SDPA", "vs plain einsum", "vs plain SDPA")
    lines = []
    for r in _sorted_ratio_rows(rows):
        if _order("attention", r["implementation"]) < 3:
            continue
        baselines = [mins.get((r["mode"], r["T"], name)) for name in (PLAIN_EINSUM, PLAIN_SDPA)]
        lines.append(
            (
                r["mode"],
                str(r["T"]),
                r["implementation"],
                _ms(r["min_ms"]),
                *("-" if ms is None else _ms(ms) for ms in baselines),
                _ratio(r.get(f"speedup_vs_{PLAIN_EINSUM}")),
                _ratio(r.get(f"speedup_vs_{PLAIN_SDPA}")),
            )
        )
    return markdown(header, lines) if lines else []


def _mark_loaded(lines: list[str]) -> list[str]:
    """A last column "loaded", "yes" on every row."""
    marks = [" loaded |", "--------|"] + [" yes    |"] * (len(lines) - 2)
    return [line + mark for line, mark in zip(lines, marks)]


# -------------------------------------------------------------------------------------- metadata


def _load(values) -> str:
    return "/".join(f"{x:.2f}" for x in values) if values else "unknown"


def metadata_line(meta: dict) -> str:
    """The line above a table: command, machine, load averages (1/5/15 min), torch, threads, commit."""
    machine = meta.get("machine", {})
    commit = meta.get("commit")
    commit = "unknown" if not commit else commit[:10] + (" (uncommitted changes)" if meta.get("dirty") else "")
    threads = meta.get("threads")
    parts = [
        f"`{meta.get('command', '?')}`",
        f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('platform', '?')}",
        f"load {_load(meta.get('load_average_start'))} at start, {_load(meta.get('load_average_end'))} at end",
        f"torch {meta.get('torch', '?')}",
        f"{threads} thread{'' if threads == 1 else 's'}",
        f"commit {commit}",
    ]
    if meta.get("date"):
        parts.append(meta["date"][:10])
    if meta.get("rounds"):
        parts.append(f"min of {meta['rounds']} rounds")
    ceilings = meta.get("ceilings")
    if ceilings:
        parts.append(
            f"one-thread ceilings {ceilings['matmul_gflop_per_s']:.0f} GFLOP/s (matmul), "
            f"{ceilings['copy_gb_per_s']:.0f} GB/s (copy)"
        )
    line = "; ".join(parts) + "."
    if meta.get("loaded"):
        line = f"**Loaded run** (1-min load reached {meta.get('load_1min_peak', '?')}): " + line
    return line


def check_load(meta: dict | None, source: str, allow_loaded: bool) -> None:
    """Refused unless the run was quiet (or --allow-loaded)."""
    if allow_loaded:
        return
    if not meta or "loaded" not in meta:
        raise Refused(f"{source}: no load average recorded; not rendered (pass --allow-loaded to render it anyway)")
    if meta["loaded"]:
        load, cores = meta.get("load_1min_peak"), meta.get("machine", {}).get("cores")
        raise Refused(
            f"{source}: measured at a 1-min load of {load} on {cores} cores (at or above the core count); "
            "not rendered (pass --allow-loaded to render it marked loaded)"
        )


def check_bounds(rows: list[dict], source: str) -> None:
    """Refused where a row runs faster than its bound: the run's ceilings were measured low (a
    slow spell during their measurement), so every fraction of the bound in it would be wrong."""
    for row in rows:
        if row.get("bound_ms") and row.get("min_ms") is not None and row["min_ms"] < row["bound_ms"]:
            what = ", ".join(f"{k} {row[k]}" for k in ("mode", "T", "pass", "implementation") if k in row)
            raise Refused(
                f"{source}: {what} took {row['min_ms']} ms, below its bound of {row['bound_ms']} ms: the run's "
                "ceilings were measured low; not rendered (measure again)"
            )


# ------------------------------------------------------------------------------------- rendering


def bench_rows(data: dict) -> list[dict]:
    """pytest-benchmark's rows: each benchmark's extra_info, with its median where none was recorded."""
    rows = []
    for bench in data.get("benchmarks", []):
        row = dict(bench.get("extra_info", {}))
        if "op" in row:
            row.setdefault("median_s", bench.get("stats", {}).get("median"))
            rows.append(row)
    return rows


def render(data: dict, source: str, allow_loaded: bool = False) -> dict[str, list[str]]:
    """{family: its block (the metadata line, a blank line, the table)} of one results file."""
    # {family: its tables}: a block holds one table, or several (cpu_dropin: steps, then attention calls).
    family = data.get("metadata", {}).get("family") if "rows" in data else None
    if family == "cpu_tubelet":  # benchmarks.cpu_tubelet
        meta = data["metadata"]
        tables = {family: [tubelet_table(data["rows"])]}
    elif family == "cpu_dropin":  # benchmarks.cpu_dropin
        meta = data["metadata"]
        tables = {family: [dropin_table(data["rows"]), dropin_shapes_table(data.get("shapes", []))]}
    elif "rows" in data:  # benchmarks.cpu_ratios
        meta = data["metadata"]
        tables = {meta["family"]: [ratio_table(data["rows"])], "headline": [headline_table(data["rows"])]}
    elif "benchmarks" in data:  # pytest-benchmark
        meta = data.get("machine_info", {}).get("vivit")
        rows = bench_rows(data)
        families: dict[str, list[dict]] = {}
        for row in rows:
            families.setdefault(f"bench_{row['op']}_{row.get('device', 'cpu')}", []).append(row)
        tables = {
            name: [format_loader_table(group) if group[0]["op"] == "loader" else format_table(group)]
            for name, group in sorted(families.items())
        }
    else:
        raise ValueError(f"{source}: neither a benchmarks.cpu_ratios file nor a pytest-benchmark JSON")
    check_load(meta, source, allow_loaded)
    check_bounds(data.get("rows", []), source)
    loaded = bool(meta and meta.get("loaded")) or meta is None
    head = metadata_line(meta) if meta else "Recorded without load averages, torch version or command."
    blocks = {}
    for name, group in tables.items():
        body = [line for table in group if table for line in ["", *(_mark_loaded(table) if loaded else table)]]
        if body:
            blocks[name] = [head, *body]
    return blocks


def render_file(path: str | Path, allow_loaded: bool = False) -> dict[str, list[str]]:
    return render(json.loads(Path(path).read_text()), str(path), allow_loaded)


def between_markers(blocks: dict[str, list[str]]) -> list[str]:
    """Each block between its markers, as --update writes it into a page."""
    lines = []
    for name, block in blocks.items():
        lines += [f"<!-- bench:{name} -->", "", *block, "", f"<!-- /bench:{name} -->", ""]
    return lines


def update_text(text: str, blocks: dict[str, list[str]], source: str) -> tuple[str, list[str]]:
    """`text` with the body of each marked block whose family is in `blocks` replaced, and the
    families replaced. ValueError for an unclosed marker or a page with no such block."""
    opened = re.findall(r"<!-- bench:([\w.-]+) -->", text)
    closed = [m.group("name") for m in MARKER.finditer(text)]
    if sorted(opened) != sorted(closed):
        unclosed = sorted(set(opened) - set(closed)) or opened
        raise ValueError(f"{source}: <!-- bench:{unclosed[0]} --> has no matching <!-- /bench:{unclosed[0]} -->")
    replaced = []

    def body(match: re.Match) -> str:
        name = match.group("name")
        if name not in blocks:
            return match.group(0)
        replaced.append(name)
        return "\n".join(between_markers({name: blocks[name]})).removesuffix("\n")

    new = MARKER.sub(body, text)
    if not replaced:
        raise ValueError(f"{source}: no <!-- bench:NAME --> block for {', '.join(sorted(blocks))}")
    return new, replaced


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="results: cpu_ratios JSON or pytest-benchmark JSON")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--update", nargs="+", type=Path, metavar="DOC", help="rewrite the marked blocks of DOC")
    action.add_argument("--check", nargs="+", type=Path, metavar="DOC", help="exit 1 if DOC's marked blocks differ")
    parser.add_argument("--allow-loaded", action="store_true", help="render runs taken under load, marked loaded")
    args = parser.parse_args(argv)

    try:
        rendered = [render_file(path, args.allow_loaded) for path in args.files]
    except (Refused, ValueError) as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    if not (args.update or args.check):
        for blocks in rendered:
            print("\n".join(between_markers(blocks)))
        return 0
    blocks: dict[str, list[str]] = {}
    for path, file_blocks in zip(args.files, rendered):
        for name in file_blocks:
            if name in blocks:
                print(f"report: {path}: a second table for {name}; give one results file per family", file=sys.stderr)
                return 2
        blocks.update(file_blocks)
    status = 0
    for doc in args.update or args.check:
        text = doc.read_text()
        try:
            new, replaced = update_text(text, blocks, str(doc))
        except ValueError as error:
            print(f"report: {error}", file=sys.stderr)
            return 2
        if args.update:
            if new != text:
                doc.write_text(new)
            print(f"{doc}: {', '.join(replaced)} rendered")
        elif new != text:
            pairs = zip(MARKER.finditer(text), MARKER.finditer(new))
            stale = [old.group("name") for old, rendered in pairs if old.group(0) != rendered.group(0)]
            print(
                f"{doc}: {', '.join(stale)} differ from {', '.join(map(str, args.files))} "
                f"(python -m benchmarks.report ... --update {doc})",
                file=sys.stderr,
            )
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
