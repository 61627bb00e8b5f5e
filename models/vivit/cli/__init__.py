"""The command-line tools: `vivit-train` (train.py), `vivit-eval` (evaluate.py) and
`vivit-predict` (predict.py), with the argument and error handling they share (common.py)."""

from .common import (
    INPUT,
    USAGE,
    Range,
    UserError,
    add_debug_flag,
    check_device,
    check_ranges,
    existing_path,
    load_checked,
    option,
    resolve_device,
    run,
)

__all__ = [
    "INPUT",
    "USAGE",
    "Range",
    "UserError",
    "add_debug_flag",
    "check_device",
    "check_ranges",
    "existing_path",
    "load_checked",
    "option",
    "resolve_device",
    "run",
]
