"""What the command-line tools share: a user's mistake is reported as one line, never a traceback.

`vivit-train`, `vivit-eval` and `vivit-predict` check their arguments and inputs before any work
starts. A mistake ends the program with `PROG: error: MESSAGE` on stderr, the message naming
the option or file, what it got and what was expected, and exit status 2 for a mistake in the
command line (as argparse) or 1 for a problem found in an input's contents (an unreadable
checkpoint, no decodable video). `--debug` shows the traceback instead. A training run that
cannot go on ends the same way with its own status: DIVERGED, WRITE_FAILED (docs/training.md,
"Long runs", lists them with STOPPED, the status of a run stopped by a signal).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_model
from ..data import DataError

USAGE, INPUT = 2, 1  # exit statuses: a mistake in the command line, a problem in an input's contents
# A run that cannot go on: a non-finite loss or gradients; a checkpoint that could not be written.
DIVERGED, WRITE_FAILED = 3, 4
# A run stopped by SIGTERM/SIGUSR1 after writing its checkpoint: resumable (EX_TEMPFAIL of sysexits.h).
STOPPED = 75


class UserError(Exception):
    """A user's mistake, or a run that cannot go on: reported as one line, exit status `status`
    (USAGE, INPUT, DIVERGED or WRITE_FAILED). `show=False`: the line is left to another process
    of a distributed run, which says the same."""

    def __init__(self, message: str, status: int = USAGE, show: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.show = show


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")


def run(
    prog: str, parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], object], argv: list[str] | None
) -> None:
    """Parse `argv` and run `body(args)`; a user's mistake exits as the module docstring says."""
    args = parser.parse_args(argv)
    try:
        body(args)
    except (UserError, CheckpointError, DataError) as error:
        if args.debug:
            raise
        status = error.status if isinstance(error, UserError) else INPUT
        line = f"{prog}: error: {' '.join(str(error).split())}"
        if getattr(error, "show", True):
            print(line, file=sys.stderr, flush=True)
        # The interpreter prints nothing for an int code; the message stays on the exception for callers.
        exit_ = SystemExit(line)
        exit_.code = status
        raise exit_ from None


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric option: >= low (> low when `open_low`), and < high when given."""

    low: float
    high: float | None = None
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high})"


def check_ranges(args: argparse.Namespace, ranges: dict[str, Range]) -> None:
    """UserError naming the first option (by attribute name) whose value, or any of whose values,
    lies outside its Range; options left unset (None) are not checked."""
    for name, allowed in ranges.items():
        value = getattr(args, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and any(v not in allowed for v in values):
            shown = " ".join(map(str, values))
            raise UserError(f"{option(name)} must be {allowed}, got {shown}")


def option(name: str) -> str:
    """The command-line spelling of an argparse attribute name: num_frames -> --num-frames."""
    return "--" + name.replace("_", "-")


def existing_path(value: str | None, name: str, kind: str = "file") -> None:
    """UserError unless `value`, the option `name`'s, exists as a "file", a "directory" or "either";
    None (not given) passes."""
    if value is None:
        return
    path = Path(value)
    what = {"file": "file", "directory": "directory", "either": "file or directory"}[kind]
    if not path.exists():
        raise UserError(f"{option(name)} {value}: no such {what}")
    if kind == "file" and not path.is_file():
        raise UserError(f"{option(name)} {value}: is a directory, expected a file")
    if kind == "directory" and not path.is_dir():
        raise UserError(f"{option(name)} {value}: not a directory")


def check_device(device: str) -> None:
    """UserError for --device cuda on a machine without a usable CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")


def resolve_device(device: str) -> torch.device:
    """--device auto/cpu/cuda as a torch.device (auto: CUDA when available)."""
    check_device(device)
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def load_checked(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(model, checkpoint) of the --checkpoint `path`; UserError naming the option and what is wrong with the file."""
    existing_path(path, "checkpoint")
    try:
        return load_model(path, device)
    except CheckpointError as error:
        raise UserError(f"--checkpoint {error}", INPUT) from None
