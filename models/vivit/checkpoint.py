"""Atomic checkpoints and the training state they carry.

A checkpoint is written to a temporary file in the destination's directory, flushed and
fsync'ed, renamed over the destination (`os.replace` is atomic on POSIX), and the directory is
fsync'ed so the rename itself survives a power cut. A process killed at any point leaves either
the previous checkpoint or the new one under the final name, never a partial file; a stray
temporary file may remain and is ignored (and cleaned up by the next save). A save that fails
(a full disk, an I/O error) raises the operating system's error and leaves the previous checkpoint
as it was.

A checkpoint holds only tensors and plain data (str, numbers, bool, None, and lists, tuples and
dicts of them), checked when it is saved, and is read with `torch.load(weights_only=True)`: a
file crafted to run code when unpickled is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import ViViT, config_from_spec

_TMP_MARK = ".tmp-"
# What `vivit-eval` and `vivit-predict` need from a checkpoint; resuming also needs the training state.
MODEL_KEYS = ("model", "model_spec", "classes", "data")
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "scheduler", "scaler", "rng", "step")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, holding more than tensors and plain data, or
    not what was expected. The message is one line and starts with the file's path."""


def check_plain(value: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of `value` that is neither a tensor nor plain data,
    which `torch.load(weights_only=True)` would refuse."""
    if value is None or isinstance(value, (torch.Tensor, str, int, float, bool)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoint keys are str or int")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds only tensors and plain data")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` (tensors and plain data; see `check_plain`) to `path` atomically. Returns the path."""
    check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{_TMP_MARK}*"):
        _remove_if_dead(stale)
    tmp = path.parent / f".{path.name}{_TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(state, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                # torch.save's zip writer reports a failed write as "unexpected pos ...": the
                # operating system's error (a full disk, an I/O error) is the one that says why.
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class _Writer:
    """A file-like that keeps the first OSError of its file's writes (see `save_checkpoint`)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.f.flush()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Read a file written by `torch.save` with `weights_only=True`: tensors and plain data only.

    Raises:
        FileNotFoundError when there is no file at `path`.
        CheckpointError for an empty, truncated or foreign file, or one that refers to other
            objects (which could run code when unpickled: refused, nothing in it runs).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        culprit = re.search(r"GLOBAL (\S+)", str(error))
        if culprit is not None:
            raise CheckpointError(
                f"{path}: refers to {culprit[1]}, which is not a tensor or plain data; refused, as loading it "
                "could run code from the file"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated, or not written by torch.save)") from None
    except Exception as error:  # a truncated or foreign file fails inside torch.load in many ways
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated, or not written by torch.save: {_first_sentence(error)})"
        ) from None


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def read_training_checkpoint(path: str | Path, keys: tuple[str, ...] = MODEL_KEYS) -> dict[str, Any]:
    """A checkpoint written by `vivit-train`, checked to hold `keys` (CheckpointError naming the missing ones)."""
    state = load_checkpoint(path)
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a vivit-train checkpoint (it has no {', '.join(map(repr, missing))})")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path):
    """The ViViTConfig of a training checkpoint's `model_spec` (CheckpointError when it describes none)."""
    try:
        return config_from_spec(state["model_spec"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its model_spec describes no model ({type(error).__name__}: {error})") from None


def check_weights(weights: Any, model_state: dict[str, torch.Tensor], path: str | Path) -> None:
    """CheckpointError unless `weights` has exactly the keys and shapes of `model_state`."""
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its 'model' entry is a {type(weights).__name__}, not a state dict")
    missing = [key for key in model_state if key not in weights]
    unexpected = [key for key in weights if key not in model_state]
    shapes = [
        f"{key} {tuple(weights[key].shape)} (its model_spec needs {tuple(want.shape)})"
        for key, want in model_state.items()
        if key in weights and (not isinstance(weights[key], torch.Tensor) or weights[key].shape != want.shape)
    ]
    problems = (
        ([f"missing {', '.join(missing[:4])}"] if missing else [])
        + ([f"unexpected {', '.join(unexpected[:4])}"] if unexpected else [])
        + shapes[:4]
    )
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit its model_spec: {'; '.join(problems)}")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model rebuilt from a `vivit-train` checkpoint (its `model_spec`), in eval mode; and the checkpoint.

    Raises FileNotFoundError, or CheckpointError naming what is wrong with the file.
    """
    state = read_training_checkpoint(path)
    config = checkpoint_config(state, path)
    classes, data = state["classes"], state["data"]
    if (
        not isinstance(classes, (list, tuple))
        or len(classes) != config.num_classes
        or not all(isinstance(name, str) for name in classes)
    ):
        raise CheckpointError(f"{path}: its classes are not {config.num_classes} label names, as its model_spec says")
    if not isinstance(data, dict) or not {"num_frames", "img_size", "mean", "std"} <= set(data):
        raise CheckpointError(f"{path}: its 'data' entry lacks num_frames, img_size, mean or std")
    clip = (data["num_frames"], data["img_size"])
    if clip != (config.num_frames, config.img_size[0]) or config.img_size[0] != config.img_size[1]:
        raise CheckpointError(
            f"{path}: its data makes clips of {clip[0]} frames of {clip[1]} px, its model takes "
            f"{config.num_frames} of {config.img_size}"
        )
    model = ViViT(config)
    check_weights(state["model"], model.state_dict(), path)
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
    """Every global random state a training step draws from (Python, NumPy, torch CPU and CUDA),
    as tensors and plain data, so a checkpoint holding it loads with weights_only=True."""
    version, words, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the random states `rng_state` returned."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss_next"]))
    np.random.set_state(
        (npy["algorithm"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
