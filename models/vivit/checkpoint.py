"""Atomic checkpoints and the training state they carry.

A checkpoint is written to a temporary file in the destination's directory, flushed and
fsync'ed, renamed over the destination (`os.replace` is atomic on POSIX), and the directory is
fsync'ed so the rename itself survives a power cut. A process killed at any point leaves either
the previous checkpoint or the new one under the final name, never a partial file; a stray
temporary file may remain and is ignored (and cleaned up by the next save).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import build_model

_TMP_MARK = ".tmp-"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` (anything torch.save takes) to `path` atomically. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        _remove_if_dead(stale)
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (full pickle: our own files only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model rebuilt from a `vivit-train` checkpoint (its `model_spec`), in eval mode; and the checkpoint."""
    state = load_checkpoint(path)
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_dead(tmp: Path) -> None:
    """Remove a temporary file left by a process that no longer runs."""
    try:
        pid = int(tmp.name.rsplit(_TMP_MARK, 1)[1])
        os.kill(pid, 0)
        if pid != os.getpid():
            return  # a live process (another run in the same directory) is still writing it
    except (ValueError, ProcessLookupError):
        pass
    except PermissionError:
        return
    tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """Every global random state a training step draws from: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
