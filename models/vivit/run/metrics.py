"""What a run reports: the metrics.jsonl writer, the records of steps, epochs and the run, memory,
the progress bar and the closing summary."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (GPU), or this process's resident memory (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None: strict JSON has no NaN,
    and `json.dumps` would write one that `jq` and most dashboards refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def to_json(record: dict, indent: int | None = None) -> str:
    """A record as strict JSON: a non-finite number is written as null."""
    return json.dumps(finite_or_null(record), allow_nan=False, indent=indent)


class Metrics:
    """JSON-lines records (main process only), strict JSON (`to_json`)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(to_json(record) + "\n")

    def keep_until(self, step: int, steps_per_epoch: int) -> None:
        """Keep only the records a run resumed at `step` will not write again: those up to `step`,
        without the interrupted run's summary or the record of an epoch it cut short."""
        if self.path is None or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            at = record.get("step", record.get("steps")) if isinstance(record, dict) else None
            event = record.get("event") if isinstance(record, dict) else None
            if (
                not isinstance(at, int)
                or at > step
                or event == "summary"
                or (event == "epoch" and at % steps_per_epoch)
            ):
                continue
            kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def zero_window() -> dict[str, float]:
    """Sums over the steps since the last metrics record."""
    return {"loss": 0.0, "correct": 0.0, "count": 0.0}


def zero_epoch() -> dict[str, float]:
    """Sums over the steps of an epoch."""
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0}


def epoch_record(epoch: int, step: int, skipped: int, totals: dict[str, float]) -> dict[str, Any]:
    """The record of an epoch that ended at `step` with `totals` (summed over processes)."""
    return {
        "event": "epoch",
        "epoch": epoch,
        "steps": step,
        "skipped_videos": skipped,
        "loss": totals["loss"] / max(totals["count"], 1),
        "acc": totals["correct"] / max(totals["count"], 1),
    }


def progress_bar(total: int, initial: int):
    """A tqdm bar on stderr, or None (with a note) when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is optional
        print("no progress bar: tqdm is not installed (pip install tqdm)", file=sys.stderr)
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stderr)


def show_on_progress(progress, record: dict[str, Any]) -> None:
    """A step record as the progress bar's postfix."""
    progress.set_postfix(
        loss=f"{record['loss']:.3f}",
        acc=f"{record['acc']:.3f}",
        clips_s=f"{record['clips_per_s']:.1f}",
        data=f"{record['data_wait_fraction']:.0%}",
        mem=f"{record['memory_mb']:.0f}MB",
        refresh=False,
    )


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"trained {s['steps']}/{s['total_steps']} steps on {s['world_size']} process(es) in {s['seconds']:.1f} s "
        f"({s['clips_per_s']:.1f} clips/s, {s['memory_mb']:.0f} MB)"
    ]
    if "val_top1" in s:
        lines.append(
            f"held-out: top-1 {100 * s['val_top1']:.1f}%  top-5 {100 * s['val_top5']:.1f}%  "
            f"({int(s['val_clips'])} clips)"
        )
    if s["skipped_videos"]:
        lines.append(f"skipped {s['skipped_videos']} unreadable video(s)")
    if s["bad_steps"] or s["scaler_skipped_steps"]:
        lines.append(
            f"skipped {s['bad_steps']} step(s) with a non-finite loss or gradients, "
            f"{s['scaler_skipped_steps']} by the fp16 gradient scaler"
        )
    lines.append(f"checkpoint: {s['checkpoint']}")
    if s["stopped_by"]:
        lines.append(
            f"stopped by {s['stopped_by']} after step {s['steps']}: the checkpoint holds it; "
            "continue with --resume auto (exit status 75)"
        )
    return "\n".join(lines)
