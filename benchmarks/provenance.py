"""Where and how a run was measured: the metadata every benchmark JSON carries.

A figure is only comparable with another taken on the same kind of machine, at a load below its
core count, with the same torch and thread count; the commit and the command say how to take it
again. `python -m benchmarks.cpu_ratios` writes this as its JSON's "metadata", the benchmark
suites under pytest-benchmark's "machine_info" -> "vivit" (benchmarks/conftest.py), and
`python -m benchmarks.report` prints it above each table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded to 0.01."""
    return [round(x, 2) for x in os.getloadavg()]


def cores() -> int:
    return os.cpu_count() or 1


def is_loaded(load_1min: float, core_count: int) -> bool:
    """A neighbour at this load slows memory-bound code (copies, permutes, einsum's intermediates)
    more than compute-bound code, so ratios taken under it are biased."""
    return load_1min >= core_count


def refuse_loaded(load_1min: float, core_count: int, allow_loaded: bool, prog: str) -> str | None:
    """The one-line refusal for a run of `prog` starting at this load, or None where it may go on."""
    if allow_loaded or not is_loaded(load_1min, core_count):
        return None
    return (
        f"{prog}: not recorded: 1-min load average {load_1min:.2f} >= {core_count} cores; "
        "rerun on a quiet machine, or pass --allow-loaded to record it marked loaded"
    )


class LoadWatch:
    """The load averages when a run starts and the highest 1-min load seen since (`on_round`,
    called between rounds), for its metadata."""

    def __init__(self, prog: str) -> None:
        self.prog, self.at_start = prog, load_average()
        self.peak = self.at_start[0]

    @classmethod
    def start(cls, prog: str, allow_loaded: bool) -> LoadWatch | None:
        """The watch of a run starting now, or None (its one-line refusal printed) where the load
        is at or above the core count and `allow_loaded` is not set."""
        watch = cls(prog)
        refusal = refuse_loaded(watch.at_start[0], cores(), allow_loaded, prog)
        if refusal:
            print(refusal, file=sys.stderr)
            return None
        return watch

    def on_round(self) -> None:
        self.peak = max(self.peak, load_average()[0])

    def metadata(self) -> dict:
        return run_metadata(self.at_start, self.peak)

    def warn_if_loaded(self, metadata: dict, out: Path, allow_loaded: bool) -> None:
        if metadata["loaded"] and not allow_loaded:
            print(
                f"{self.prog}: the 1-min load reached {metadata['load_1min_peak']:.2f} (>= {cores()} cores): "
                f"{out} is marked loaded",
                file=sys.stderr,
            )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--rounds and --allow-loaded, as every one-thread CPU ratio benchmark takes them."""
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (min taken)")
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="record at a load at or above the core count, every row marked loaded",
    )


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it); (None, None) outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def command_line() -> str:
    """The command as typed: `python -m <module> ...` for a module run, else argv."""
    argv = list(sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name not in ("__main__", None):
        argv = ["python", "-m", spec.name.removesuffix(".__main__"), *argv[1:]]
    return shlex.join(argv)


def run_metadata(load_at_start: list[float], peak_load: float | None = None) -> dict:
    """Machine, load averages (at start and now), torch, threads, commit, date and command.

    `peak_load`: the highest 1-min load seen while measuring (default: start and end); the run is
    "loaded" when it reached the core count.
    """
    load_at_end = load_average()
    commit, dirty = git_commit()
    peak = max(load_at_start[0], load_at_end[0], peak_load or 0.0)
    return {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cores": cores()},
        "load_average_start": load_at_start,
        "load_average_end": load_at_end,
        "load_1min_peak": peak,
        "loaded": is_loaded(peak, cores()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
    }
