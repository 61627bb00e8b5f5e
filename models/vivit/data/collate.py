"""Batching that drops unreadable videos and reports them."""

from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    """Stack the decodable items of a batch.

    Returns {"video": (B, ...) or None when nothing decoded, "label": (B,) int64,
    "skipped": [(path, reason)] of the items whose video is None}.
    """
    kept = [item for item in items if item["video"] is not None]
    skipped = [(item.get("path", "?"), item.get("error", "unreadable")) for item in items if item["video"] is None]
    video = torch.stack([item["video"] for item in kept]) if kept else None
    label = torch.tensor([int(item["label"]) for item in kept], dtype=torch.int64)
    return {"video": video, "label": label, "skipped": skipped}
