"""The data of a run: training and held-out sets from the arguments, and the training loader."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..cli.common import UserError
from ..data import MovingShapes, ShardedSampler, VideoFolder, collate


def build_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(train, held-out or None, class names). CSV problems raise before any training."""
    if args.train_csv:
        common = dict(
            root=args.data_root,
            num_frames=args.num_frames,
            size=args.img_size,
            mean=args.mean,
            std=args.std,
            seed=args.seed,
        )
        train = VideoFolder(args.train_csv, train=True, flip=not args.no_flip, **common)
        val = None
        if args.val_csv:
            val = VideoFolder(
                args.val_csv,
                classes=train.classes,
                train=False,
                temporal_views=args.temporal_views,
                spatial_crops=args.spatial_crops,
                **common,
            )
        return train, val, train.classes
    common = dict(num_frames=args.num_frames, size=args.img_size, mean=tuple(args.mean), std=tuple(args.std))
    try:
        train = MovingShapes(args.synthetic_clips, seed=args.data_seed, **common)
        val = None
        if args.synthetic_val_clips:
            val = MovingShapes(args.synthetic_val_clips, seed=args.data_seed + 1, **common)
    except ValueError as error:
        raise UserError(
            f"--num-frames {args.num_frames}, --img-size {args.img_size}: the built-in data (no "
            f"--train-csv) cannot make such clips ({error})"
        ) from None
    return train, val, list(MovingShapes.classes)


def make_loader(dataset, batch_size: int, sampler: ShardedSampler, workers: int, seed: int = 0) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run
    # resumed mid-epoch (one more iterator) would diverge from an uninterrupted one.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        drop_last=False,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
