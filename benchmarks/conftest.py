"""Fixtures of the benchmark suites, the speedups against the einsum baseline, and the end-of-session table."""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from typing import Callable

import pytest
import torch

from .cases import BASELINE, TORCH_BASELINES, parse_target
from .loader import OLD as LOADER_OLD
from .loader import OLD_DECODE as LOADER_OLD_DECODE
from .measure import run_case

RESULTS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []


def require_target(target: str) -> tuple[torch.device, torch.dtype]:
    """The (device, dtype) of a target; skips CUDA targets on machines without a CUDA device."""
    device, dtype = parse_target(target)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{target}: no CUDA device on this machine")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{target}: this GPU has no bf16 support")
    return device, dtype


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc): tensors of a few MB are carved out
    of the heap, and without this the session's RSS grows by every freed model and activation."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def smoke_threads(benchmark):
    """One torch thread inside, for the smoke run (--benchmark-disable): it checks that the code
    runs, not its speed, and one thread keeps it quick on a busy machine, where two OpenMP threads
    can wait on each other for seconds. A timed run keeps its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if benchmark.disabled else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def checked(benchmark):
    """checked(check, spec): `check(spec)` once, before the case is timed (benchmarks/check.py;
    the drop-in and loader suites bring their own); a wrong result fails its benchmark there."""

    def run(check: Callable[[dict], None], spec: dict) -> None:
        with smoke_threads(benchmark):
            check(spec)
        _release_freed_memory()

    return run


@pytest.fixture
def measure(benchmark, request):
    """measure(spec): build, warm up, time and record one case (see benchmarks/measure.py)."""

    def run(spec: dict) -> None:
        if benchmark.disabled:
            with smoke_threads(benchmark):
                run_case(benchmark, spec)
            return
        run_case(benchmark, spec)
        _release_freed_memory()
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["flop_per_s"] = benchmark.extra_info["flops"] / median if median > 0 else None
        request.config.stash[RESULTS].append(benchmark.extra_info)

    return run


def _key(info: dict) -> tuple:
    """Rows that compare against the same baseline run."""
    return (info["op"], info["case"], info["pass"], info["device"], info["dtype"], info["shape_name"])


def fill_speedups(rows: list[dict]) -> None:
    """speedup_vs_einsum (and speedup_vs_torch: SDPA, Conv3d) = baseline median / median, where the baseline ran;
    for the loader, clips_per_s and speedup_vs_old."""
    medians = {(_key(r), r["backend"]): r["median_s"] for r in rows}
    for row in rows:
        key, median = _key(row), row["median_s"]
        if row["op"] == "loader":
            row["clips_per_s"] = 1 / median if median > 0 else None
            for name, baseline in (("old", LOADER_OLD), ("old_decode", LOADER_OLD_DECODE)):
                theirs = medians.get((key, baseline))
                row[f"speedup_vs_{name}"] = theirs / median if theirs and median > 0 else None
            continue
        einsum = medians.get((key, BASELINE))
        row["speedup_vs_einsum"] = einsum / median if einsum and median > 0 else None
        torch_name = TORCH_BASELINES.get(row["op"])
        if torch_name:
            theirs = medians.get((key, torch_name))
            row["speedup_vs_torch"] = theirs / median if theirs and median > 0 else None
            row["torch_baseline"] = torch_name


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    # Before pytest-benchmark writes --benchmark-json, so the speedups are in the file.
    fill_speedups(session.config.stash[RESULTS])
    yield


def _bytes(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _markdown(header: tuple, lines: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    out += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in lines]
    return out


def format_table(rows: list[dict]) -> list[str]:
    """One line per result, grouped by op, shape, device/dtype and pass, baseline first."""
    header = (
        "op / mode", "shape", "target", "backend", "pass", "median", "GFLOP/s", "vs einsum", "vs SDPA/Conv3d",
        "peak mem", "saved for bwd",
    )
    order = {BASELINE: 0, "sdpa": 1, "conv3d": 1, "unfold_matmul": 2}
    ops = {"attention": 0, "tubelet": 1, "training": 2}
    rows = sorted(rows, key=lambda r: (ops.get(r["op"], 3), _key(r), order.get(r["backend"], 3), r["backend"]))
    lines = []
    for r in rows:
        speedup = r.get("speedup_vs_einsum")
        rate = r.get("flop_per_s")
        lines.append(
            (
                r["case"] if r["op"] in ("attention", r["case"]) else f"{r['op']}: {r['case']}",
                r["shape_name"],
                f"{r['device']} {r['dtype']}",
                "einsum" if r["backend"] == BASELINE else r["backend"],
                "fwd+bwd" if r["pass"] == "forward+backward" else r["pass"].replace("forward", "fwd"),
                _time(r["median_s"]),
                "-" if rate is None else f"{rate / 1e9:.1f}",
                "-" if speedup is None else f"{speedup:.2f}x",
                "-" if r.get("speedup_vs_torch") is None else f"{r['speedup_vs_torch']:.2f}x",
                _bytes(r["peak_bytes"]),
                _bytes(r["saved_for_backward_bytes"]) if r["pass"] != "forward" else "-",
            )
        )
    return _markdown(header, lines)


def format_loader_table(rows: list[dict]) -> list[str]:
    """The loader rows: one per file and path, the old path first."""
    header = ("file", "path", "video frames", "median / clip", "clips/s per worker", "vs old", "vs old decode",
              "peak mem per worker")
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
    return _markdown(header, lines) if lines else []


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(RESULTS, [])
    loader = format_loader_table(rows)
    if loader:
        terminalreporter.section("vivit-kernels: video loader, one worker (one core), training clips (medians)")
        for line in loader:
            terminalreporter.write_line(line)
    rows = [r for r in rows if r["op"] != "loader"]
    if not rows:
        return
    methods = sorted({r["peak_method"] for r in rows})
    terminalreporter.section("vivit-kernels: fused vs naive einsum (medians)")
    for line in format_table(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. FLOP/s from the stated formulas "
        "(attention: forward 4*B*H*N*L*Dh, backward 2.5x; training: FlopCounterMode). "
        "peak mem: bytes above those allocated before the call (inputs, parameters, optimiser state), "
        + "; ".join(methods) + "."
    )
