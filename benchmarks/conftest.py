"""Fixtures of the benchmark suites, speedups against the baselines, the run's metadata, the end-of-session table."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch

from .core import TORCH_BASELINES, einsum_baseline, parse_target
from .loader import OLD as LOADER_OLD
from .loader import OLD_DECODE as LOADER_OLD_DECODE
from .measure import device_ceilings, roofline, run_case
from .provenance import load_average, run_metadata
from .report import format_loader_table, format_table, metadata_line

RESULTS = pytest.StashKey[list]()
# The load averages at the session's start, and the highest 1-min load seen at any benchmark.
LOAD_AT_START = pytest.StashKey[list]()
PEAK_LOAD = pytest.StashKey[float]()
# The matmul and copy ceilings of each target benchmarked, measured at its first timed case.
CEILINGS = pytest.StashKey[dict]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []
    config.stash[LOAD_AT_START] = load_average()
    config.stash[PEAK_LOAD] = config.stash[LOAD_AT_START][0]
    config.stash[CEILINGS] = {}


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """machine_info["vivit"]: benchmarks.provenance.run_metadata (load averages, torch, threads,
    commit, command; "loaded" where the 1-min load reached the core count), which
    `python -m benchmarks.report` prints above the tables and checks."""
    machine_info["vivit"] = run_metadata(config.stash[LOAD_AT_START], config.stash[PEAK_LOAD])


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
            # No ceilings in the smoke run (they would cost seconds per target): the fields stay None.
            benchmark.extra_info.update(roofline(benchmark.extra_info, None, None))
            return
        run_case(benchmark, spec)
        request.config.stash[PEAK_LOAD] = max(request.config.stash[PEAK_LOAD], load_average()[0])
        _release_freed_memory()
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_s"] = median
        benchmark.extra_info["flop_per_s"] = benchmark.extra_info["flops"] / median if median > 0 else None
        ceilings = request.config.stash[CEILINGS]
        if spec["target"] not in ceilings:
            ceilings[spec["target"]] = device_ceilings(spec["target"])
        benchmark.extra_info.update(roofline(benchmark.extra_info, median, ceilings[spec["target"]]))
        request.config.stash[RESULTS].append(benchmark.extra_info)

    return run


def _key(info: dict) -> tuple:
    """Rows that compare against the same baseline run."""
    return (info["op"], info["case"], info["pass"], info["device"], info["dtype"], info["shape_name"])


def fill_speedups(rows: list[dict]) -> None:
    """speedup_vs_einsum (and speedup_vs_torch: SDPA, Conv3d) = baseline median / median, where the baseline ran
    (for attention the plain baselines of benchmarks/attention.py); for the loader, clips_per_s and speedup_vs_old."""
    medians = {(_key(r), r["backend"]): r["median_s"] for r in rows}
    for row in rows:
        key, median = _key(row), row["median_s"]
        if row["op"] == "loader":
            row["clips_per_s"] = 1 / median if median > 0 else None
            for name, baseline in (("old", LOADER_OLD), ("old_decode", LOADER_OLD_DECODE)):
                theirs = medians.get((key, baseline))
                row[f"speedup_vs_{name}"] = theirs / median if theirs and median > 0 else None
            continue
        einsum = medians.get((key, einsum_baseline(row["op"])))
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
    terminalreporter.section("vivit-kernels: against the einsum and torch baselines (medians)")
    terminalreporter.write_line(metadata_line(run_metadata(config.stash[LOAD_AT_START], config.stash[PEAK_LOAD])))
    for line in format_table(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "FLOP/s from the stated formulas "
        "(attention: forward 4*B*H*N*L*Dh, backward 2.5x; training: FlopCounterMode). "
        "GB/s from the compulsory-traffic formulas (attention, tubelet; '-' elsewhere). "
        "of bound: the slower of the FLOPs at the session's matmul ceiling and the bytes at its copy ceiling, "
        "over the median. "
        "peak mem: bytes above those allocated before the call (inputs, parameters, optimiser state), "
        + "; ".join(methods)
        + "."
    )
