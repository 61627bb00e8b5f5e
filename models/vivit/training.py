"""A training run: set-up and resume, epochs of optimiser steps, held-out evaluation and checkpoints.

`Trainer(args, ctx)` sets everything up from the parsed `vivit-train` arguments (data, model,
optimiser, schedule; the state of a checkpoint when resuming); `run()` trains to the last step
and returns the summary. One process, or one of many under torchrun (DDP or FSDP): every
process runs the same steps on its shard of each global batch; only the main process writes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vivit_kernels import BackendUnsupportedError, attention_backend

from . import distributed
from .checkpoint import (RESUME_KEYS, CheckpointError, check_weights, checkpoint_config, read_training_checkpoint,
                         rng_state, save_checkpoint, set_rng_state)
from .cli import INPUT, Range, UserError, check_ranges, existing_path
from .config import EXECUTION_FIELDS, TRAINING_ONLY_FIELDS, ViViTConfig, config_differences, format_differences
from .data import MovingShapes, ShardedSampler, VideoFolder, collate
from .evaluation import PRECISIONS, autocast, evaluate
from .model import ViViT, build_model, config_from_spec, model_spec

# ----------------------------------------------------------------------------- set-up


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the data: 8 frames of 32 px built-in, 32 of 224 for videos."""
    builtin = not args.train_csv
    args.num_frames = args.num_frames or (8 if builtin else 32)
    args.img_size = args.img_size or (32 if builtin else 224)
    if args.workers is None:
        args.workers = 0 if builtin else min(4, os.cpu_count() or 1)


# The allowed values of vivit-train's numeric options (argparse attribute names).
_RANGES = {
    "synthetic_clips": Range(1), "synthetic_val_clips": Range(0), "num_frames": Range(1), "img_size": Range(1),
    "std": Range(0, open_low=True), "temporal_views": Range(1), "spatial_crops": Range(1), "workers": Range(0),
    "dim": Range(1), "depth": Range(1), "heads": Range(1), "mlp_ratio": Range(0, open_low=True),
    "temporal_depth": Range(1), "tubelet": Range(1), "drop_path": Range(0, 1), "dropout": Range(0, 1),
    "lr": Range(0), "momentum": Range(0), "weight_decay": Range(0), "warmup_steps": Range(0), "min_lr": Range(0),
    "label_smoothing": Range(0, 1), "mixup": Range(0), "clip_grad": Range(0, open_low=True), "batch_size": Range(1),
    "accum_steps": Range(1), "steps": Range(1), "epochs": Range(0, open_low=True), "checkpoint_every": Range(0),
    "stop_at": Range(1), "eval_every": Range(0), "log_every": Range(1), "dist_timeout": Range(0, open_low=True),
    "threads": Range(1),
}

# ViViTConfig field -> the vivit-train option (argparse attribute) that sets it.
_FIELD_ARGS = {"variant": "variant", "img_size": "img_size", "num_frames": "num_frames", "tokeniser": "tokeniser",
               "drop_rate": "dropout", "drop_path_rate": "drop_path", "backend": "backend", "dim": "dim",
               "depth": "depth", "num_heads": "heads", "mlp_ratio": "mlp_ratio", "temporal_depth": "temporal_depth",
               "tubelet": "tubelet", "memory": "memory"}
# How a message names a field: its option, or what sets it.
_FIELD_NAMES = {**{field: "--" + arg.replace("_", "-") for field, arg in _FIELD_ARGS.items()},
                "num_classes": "classes"}
# Fields no option sets: a run takes them from the checkpoint it resumes or fine-tunes.
_INHERITED_FIELDS = ("in_chans", "pooling", "mlp_activation", "attention_order", "qkv_bias", "norm_eps", "attn_drop_rate")


def check_args(args: argparse.Namespace, ctx: distributed.Context) -> None:
    """Every check of the arguments alone, before any data or weights are read: UserError naming the option."""
    check_ranges(args, _RANGES)
    per_step = ctx.world_size * args.accum_steps
    if args.batch_size % per_step:
        raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of processes x --accum-steps "
                        f"= {per_step}")
    if args.precision == "fp16" and ctx.device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    if args.val_csv and not args.train_csv:
        raise UserError("--val-csv needs --train-csv (its labels define the classes)")
    for name in ("train_csv", "val_csv"):
        existing_path(getattr(args, name), name)
    existing_path(args.data_root, "data_root", "directory")
    existing_path(args.pretrained, "pretrained", "either")
    if args.resume != "auto":
        existing_path(args.resume, "resume")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {args.output_dir}: exists and is not a directory")
    check_backend(args.backend, model_config(args), ctx.device, args.precision)


def model_config(args: argparse.Namespace, num_classes: int = 1, inherit: ViViTConfig | None = None) -> ViViTConfig:
    """The ViViTConfig of the arguments' model; UserError naming the options when they describe none."""
    try:
        return config_from_spec(spec_from_args(args, num_classes, inherit))
    except ValueError as error:
        message = str(error).removeprefix("ViViTConfig: ")
        for field, name in _FIELD_NAMES.items():  # "num_heads must", "dim=64" -> "--heads must", "--dim 64"
            message = re.sub(rf"\b{field}(=| must| is)", lambda m, name=name: name + (" " if m[1] == "=" else m[1]),
                             message)
        raise UserError(message) from None


def check_backend(backend: str, config: ViViTConfig, device: torch.device, precision: str) -> None:
    """UserError unless `backend` names a backend that runs this model's attention on `device` at `precision`."""
    if backend == "auto":  # auto always finds one (the reference at worst)
        return
    q = torch.zeros(1, 2, 2, config.dim // config.num_heads, device=device, dtype=PRECISIONS[precision] or torch.float32)
    try:
        attention_backend(q, q, q, frames=1, mode="joint", backend=backend)
    except (ValueError, BackendUnsupportedError) as error:
        raise UserError(f"--backend {backend}: {error}") from None


def spec_from_args(args: argparse.Namespace, num_classes: int, inherit: ViViTConfig | None = None) -> dict[str, Any]:
    """The `model_spec` of the model the arguments describe: stored in every checkpoint.

    `inherit`: the config of a checkpoint the run resumes or fine-tunes, whose settings that no
    option sets (activation, LayerNorm eps, ...) the model takes.
    """
    overrides: dict[str, Any] = {}
    for field, arg in _FIELD_ARGS.items():
        if field != "variant" and getattr(args, arg) is not None:
            overrides[field] = tuple(args.tubelet) if field == "tubelet" else getattr(args, arg)
    if inherit is not None:
        default = ViViTConfig(variant=inherit.variant)
        overrides.update({field: getattr(inherit, field) for field in _INHERITED_FIELDS
                          if getattr(inherit, field) != getattr(default, field)})
    return model_spec(args.preset, args.variant, num_classes, **overrides)


def build_datasets(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(train, held-out or None, class names). CSV problems raise before any training."""
    if args.train_csv:
        common = dict(root=args.data_root, num_frames=args.num_frames, size=args.img_size, mean=args.mean,
                      std=args.std, seed=args.seed)
        train = VideoFolder(args.train_csv, train=True, flip=not args.no_flip, **common)
        val = None
        if args.val_csv:
            val = VideoFolder(args.val_csv, classes=train.classes, train=False, temporal_views=args.temporal_views,
                              spatial_crops=args.spatial_crops, **common)
        return train, val, train.classes
    common = dict(num_frames=args.num_frames, size=args.img_size, mean=tuple(args.mean), std=tuple(args.std))
    try:
        train = MovingShapes(args.synthetic_clips, seed=args.data_seed, **common)
        val = None
        if args.synthetic_val_clips:
            val = MovingShapes(args.synthetic_val_clips, seed=args.data_seed + 1, **common)
    except ValueError as error:
        raise UserError(f"--num-frames {args.num_frames}, --img-size {args.img_size}: the built-in data (no "
                        f"--train-csv) cannot make such clips ({error})") from None
    return train, val, list(MovingShapes.classes)


def make_loader(dataset, batch_size: int, sampler: ShardedSampler, workers: int, seed: int = 0) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run
    # resumed mid-epoch (one more iterator) would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=False, persistent_workers=False, generator=torch.Generator().manual_seed(seed))


def make_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on matrices only (not on norms, biases, positional embeddings, CLS tokens)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.removeprefix("module.")
        (no_decay if param.ndim <= 1 or plain.endswith(("pos_embed", "cls_token")) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=args.lr)


def make_scheduler(args: argparse.Namespace, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then cosine decay to --min-lr (or constant)."""
    warmup, floor = args.warmup_steps, args.min_lr / args.lr if args.lr else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if args.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- losses and logs


def targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets (B, K)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return one_hot * (1.0 - smoothing) + smoothing / num_classes


def mixup(video: torch.Tensor, labels: torch.Tensor, num_classes: int, alpha: float, smoothing: float):
    """Mix each clip with another of the batch: x = lam x_i + (1 - lam) x_j, same for targets."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(video.shape[0]).to(video.device)
    y = targets(labels, num_classes, smoothing)
    return video.lerp(video[perm], 1.0 - lam), y.lerp(y[perm], 1.0 - lam)


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


class Metrics:
    """JSON-lines records (main process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

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
            if not isinstance(at, int) or at > step or event == "summary" or (event == "epoch" and at % steps_per_epoch):
                continue
            kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)


def _zero_window() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0}


def _zero_epoch() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0}


def _preview(classes: list[str], shown: int = 6) -> str:
    """"3 classes (a, b, c)", at most `shown` names."""
    names = ", ".join(classes[:shown]) + (", ..." if len(classes) > shown else "")
    return f"{len(classes)} classes ({names})"


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"trained {s['steps']}/{s['total_steps']} steps on {s['world_size']} process(es) in {s['seconds']:.1f} s "
             f"({s['clips_per_s']:.1f} clips/s, {s['memory_mb']:.0f} MB)"]
    if "val_top1" in s:
        lines.append(f"held-out: top-1 {100 * s['val_top1']:.1f}%  top-5 {100 * s['val_top5']:.1f}%  "
                     f"({int(s['val_clips'])} clips)")
    if s["skipped_videos"]:
        lines.append(f"skipped {s['skipped_videos']} unreadable video(s)")
    lines.append(f"checkpoint: {s['checkpoint']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One training run as the `vivit-train` arguments say (see `run`)."""

    def __init__(self, args: argparse.Namespace, ctx: distributed.Context) -> None:
        fill_defaults(args)
        check_args(args, ctx)
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args, self.ctx = args, ctx
        self.out_dir = Path(args.output_dir)
        self.metrics = Metrics(self.out_dir / "metrics.jsonl" if ctx.is_main else None)
        self.ckpt_path = self.out_dir / "checkpoint.pt"

        self.train_set, self.val_set, self.classes = build_datasets(args)  # a bad CSV fails here, before any step
        # Checkpoints are read and checked against the arguments before any model is built.
        self.resume_path, resume_state = self._read_resume()
        pretrained, pretrained_config = self._read_pretrained() if resume_state is None else (None, None)
        inherit = checkpoint_config(resume_state, self.resume_path) if resume_state is not None else pretrained_config
        if pretrained_config is not None:
            self._check_video_pretrained(pretrained_config)
        self.spec = spec_from_args(args, len(self.classes), inherit)
        if resume_state is not None:
            self._check_resume(resume_state)
        if ctx.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"--output-dir {args.output_dir}: cannot create it ({error.strerror})") from None
            if not os.access(self.out_dir, os.W_OK | os.X_OK):
                raise UserError(f"--output-dir {args.output_dir}: not writable")
        self.model = self._build_model(pretrained, pretrained_config)
        self.optimizer = make_optimizer(args, self.model)

        # Clips per process per micro-step; the sampler shards each global batch over processes.
        self.micro = args.batch_size // (ctx.world_size * args.accum_steps)
        self.sampler = ShardedSampler(len(self.train_set), shuffle=True, seed=args.seed, rank=ctx.rank,
                                      world_size=ctx.world_size)
        self.items_per_step = self.micro * args.accum_steps  # per process
        self.steps_per_epoch = self.sampler.per_rank // self.items_per_step
        if self.steps_per_epoch < 1:
            raise UserError(f"--batch-size {args.batch_size}: the {len(self.train_set)} training clips do not fill "
                            "one batch")
        self.total_steps = args.steps or max(1, round(args.epochs * self.steps_per_epoch))
        self.stop = min(self.total_steps, args.stop_at) if args.stop_at else self.total_steps
        self.scheduler = make_scheduler(args, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
        self.step = 0
        self._resume_or_seed(resume_state)

        self.progress = None
        self.skipped_total, self.warned = 0, set()
        # Clips decoded and skipped by this process, until some clip anywhere was read: a run in
        # which no video decodes must fail before it writes a checkpoint.
        self.clips_read = self.clips_skipped = 0
        self.readable_seen, self.first_unreadable = False, None
        self.run_clips = 0.0
        self.last_eval: dict[str, float] | None = None

    def _read_resume(self) -> tuple[str | None, dict[str, Any] | None]:
        """(path, state) of the checkpoint --resume names ('auto': the output directory's, if any)."""
        resume = self.args.resume
        if resume == "auto":
            resume = str(self.ckpt_path) if self.ckpt_path.is_file() else None
        if not resume:
            return None, None
        try:
            return resume, read_training_checkpoint(resume, RESUME_KEYS)
        except CheckpointError as error:
            raise UserError(f"--resume {error}", INPUT) from None

    def _read_pretrained(self) -> tuple[dict[str, torch.Tensor] | None, ViViTConfig | None]:
        """--pretrained's weights, and the config of the video model they belong to (None: an image ViT)."""
        path = self.args.pretrained
        if not path:
            return None, None
        from .pretrained import read_pretrained

        try:
            return read_pretrained(path)
        except CheckpointError as error:
            raise UserError(f"--pretrained {error}", INPUT) from None
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise UserError(f"--pretrained {path}: {error}", INPUT) from None

    def _check_video_pretrained(self, theirs: ViViTConfig) -> None:
        """A video model fine-tunes into the same architecture: only frames, frame size and classes may differ."""
        ours = model_config(self.args, len(self.classes))
        ignore = (*EXECUTION_FIELDS, *TRAINING_ONLY_FIELDS, *_INHERITED_FIELDS, "num_classes", "num_frames", "img_size")
        differences = config_differences(theirs, ours, ignore=ignore)
        if differences:
            raise UserError(f"--pretrained {self.args.pretrained} is a video model other than the arguments': "
                            f"{format_differences(differences, _FIELD_NAMES)} (checkpoint vs arguments); pass its "
                            "options to fine-tune it")

    def _check_resume(self, state: dict[str, Any]) -> None:
        """The checkpoint continues this run: same model, classes and optimiser, weights that fit."""
        args, path = self.args, self.resume_path
        if list(state["classes"]) != list(self.classes):
            raise UserError(f"--resume {path}: trained on {_preview(state['classes'])}, but the training data has "
                            f"{_preview(self.classes)}")
        theirs, ours = checkpoint_config(state, path), config_from_spec(self.spec)
        differences = config_differences(theirs, ours)
        if theirs.variant != ours.variant:  # the pooling follows from the variant: naming it too says nothing
            differences = [d for d in differences if d[0] != "pooling"]
        if differences:
            raise UserError(f"--resume {path}: the checkpoint's model differs from the arguments': "
                            f"{format_differences(differences, _FIELD_NAMES)} (checkpoint vs arguments); resume with "
                            "the options it was trained with")
        saved = state.get("args", {}).get("optimizer") if isinstance(state.get("args"), dict) else None
        if saved is not None and saved != args.optimizer:
            raise UserError(f"--optimizer {args.optimizer}: --resume {path} holds the state of {saved}")
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            expected = ViViT(ours).state_dict()
        try:
            check_weights(state["model"], expected, path)
        except CheckpointError as error:
            raise UserError(f"--resume {error}", INPUT) from None

    def _build_model(self, pretrained: dict[str, torch.Tensor] | None,
                     video: ViViTConfig | None) -> torch.nn.Module:
        args, ctx = self.args, self.ctx
        seed_everything(args.seed)  # the same initial weights on every process
        model = build_model(self.spec)
        if pretrained is not None:
            from .pretrained import load_image_pretrained, load_video_pretrained

            try:
                if video is not None:
                    report = load_video_pretrained(model, pretrained, video)
                    how = f"a {video.variant} video model, {video.num_frames} frames of {video.img_size}"
                else:
                    report = load_image_pretrained(model, pretrained, tubelet_init=args.init)
                    how = args.init
            except ValueError as error:
                raise UserError(f"--pretrained {args.pretrained}: {error}", INPUT) from None
            if ctx.is_main:
                print(f"initialised from {args.pretrained} ({how}): {report}", file=sys.stderr)
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        model.to(ctx.device)
        return distributed.wrap(model, ctx, "fsdp" if args.fsdp else "ddp")

    def _resume_or_seed(self, state: dict[str, Any] | None) -> None:
        """Continue from --resume's checkpoint `state` (model, optimiser, schedule, scaler, step, RNG
        states), or start fresh with per-process seeds for dropout, drop-path and mixup."""
        args, ctx = self.args, self.ctx
        if state is None:
            if ctx.is_main and self.metrics.path.exists():
                self.metrics.path.unlink()  # a fresh run starts a fresh record
            seed_everything(args.seed + ctx.rank)
            return
        distributed.load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"], ctx)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        if ctx.is_main:
            self.metrics.keep_until(self.step, self.steps_per_epoch)  # the steps after it are run again
            print(f"resumed from {self.resume_path} at step {self.step}", file=sys.stderr)

    # ------------------------------------------------------------------------- steps and epochs

    def run(self) -> dict[str, Any]:
        """Train from the current step to the last (or --stop-at), then checkpoint, evaluate and
        summarise; returns the summary (also written to summary.json)."""
        if self.ctx.is_main and not self.args.no_progress:
            try:
                from tqdm import tqdm
            except ImportError:  # the bar is optional
                print("no progress bar: tqdm is not installed (pip install tqdm)", file=sys.stderr)
            else:
                self.progress = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                                     file=sys.stderr)
        self.model.train()
        run_start = time.perf_counter()
        # Clips and losses since the last metrics record (which may lie in the previous epoch).
        self.window, self.window_start = _zero_window(), run_start
        while self.step < self.stop:
            self.run_epoch()
        if self.progress is not None:
            self.progress.close()
        return self.finish(time.perf_counter() - run_start)

    def run_epoch(self) -> None:
        """The steps of the current epoch from the current position (to its end or --stop-at)."""
        args = self.args
        epoch, position = divmod(self.step, self.steps_per_epoch)
        self.sampler.set_epoch(epoch, position * self.items_per_step)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        batches = iter(make_loader(self.train_set, self.micro, self.sampler, args.workers, args.seed + epoch))
        totals = _zero_epoch()
        while position < self.steps_per_epoch and self.step < self.stop:
            self.train_step(batches, totals)
            self.step += 1
            position += 1
            self.log(epoch, totals)
            if self.progress is not None:
                self.progress.update(1)
            self.evaluate_and_checkpoint()
        self.end_epoch(epoch, totals)

    def train_step(self, batches, totals: dict[str, float]) -> None:
        """One optimiser step over --accum-steps micro-batches. Adds the step's seconds and those
        spent waiting for batches to the window (the progress line's data-wait fraction)."""
        args = self.args
        step_start = time.perf_counter()
        waited = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        ddp = isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
        for micro_step in range(args.accum_steps):
            wait_start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - wait_start
            self._note_skipped(batch, totals)
            sync = micro_step == args.accum_steps - 1 or not ddp  # DDP all-reduces on the last micro-step only
            with nullcontext() if sync else self.model.no_sync():
                self._micro_step(batch)
        if args.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.window["data_s"] = self.window.get("data_s", 0.0) + waited
        self.window["step_s"] = self.window.get("step_s", 0.0) + time.perf_counter() - step_start

    def _micro_step(self, batch: dict) -> None:
        args, device = self.args, self.ctx.device
        if batch["video"] is None:
            # Every clip of this micro-batch was unreadable: a forward and backward of a blank
            # clip with zero weight keeps the processes' collectives in step.
            blank = torch.zeros(1, 3, args.num_frames, args.img_size, args.img_size, device=device)
            with autocast(device, args.precision):
                loss = self.model(blank).float().sum() * 0.0
            self.scaler.scale(loss).backward()
            return
        video = batch["video"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        num_classes = len(self.classes)
        with autocast(device, args.precision):
            if args.mixup > 0:
                video, soft = mixup(video, labels, num_classes, args.mixup, args.label_smoothing)
                logits = self.model(video)
                loss = torch.sum(-soft * F.log_softmax(logits.float(), -1), -1).mean()
            else:
                logits = self.model(video)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
        self.scaler.scale(loss / args.accum_steps).backward()
        n = labels.shape[0]
        self.clips_read += n
        self.window["loss"] += loss.item() * n
        self.window["correct"] += (logits.argmax(-1) == labels).sum().item()
        self.window["count"] += n

    def _note_skipped(self, batch: dict, totals: dict[str, float]) -> None:
        for path, reason in batch["skipped"]:
            totals["skipped"] += 1
            self.clips_skipped += 1
            if not self.warned:
                self.first_unreadable = f"{path}: {reason}"
            if path not in self.warned:
                self.warned.add(path)
                warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=1)

    def log(self, epoch: int, totals: dict[str, float]) -> None:
        """Every --log-every steps (and at the last): a metrics record, and the window summed over
        processes into the epoch's totals; the progress bar every step."""
        ctx, window = self.ctx, self.window
        log_now = self.step % self.args.log_every == 0 or self.step == self.stop
        if not log_now and self.progress is None:
            return
        sums = [window["loss"], window["correct"], window["count"], window.get("data_s", 0.0), window.get("step_s", 0.0)]
        loss_sum, correct, count, data_s, step_s = distributed.all_reduce_sum(sums, ctx) if log_now else sums
        now = time.perf_counter()
        clips_per_s = count * (ctx.world_size if not log_now else 1) / max(now - self.window_start, 1e-9)
        # Near 1, the steps wait on the loader (more --workers, or a faster decode, would help).
        data_wait = data_s / step_s if step_s > 0 else 0.0
        record = {"step": self.step, "epoch": epoch, "loss": loss_sum / max(count, 1), "acc": correct / max(count, 1),
                  "lr": self.scheduler.get_last_lr()[0], "clips_per_s": clips_per_s, "memory_mb": memory_mb(ctx.device),
                  "data_wait_fraction": data_wait}
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                      clips_s=f"{clips_per_s:.1f}", data=f"{data_wait:.0%}",
                                      mem=f"{record['memory_mb']:.0f}MB", refresh=False)
        if not log_now:
            return
        self.metrics.write(record)
        for key, value in (("loss", loss_sum), ("correct", correct), ("count", count)):
            totals[key] += value
        self.run_clips += count
        self.window, self.window_start = _zero_window(), now

    def end_epoch(self, epoch: int, totals: dict[str, float]) -> None:
        """The epoch's record (also when --stop-at ends it early)."""
        self._check_readable()
        skipped = int(distributed.all_reduce_sum([totals["skipped"]], self.ctx)[0])
        self.skipped_total += skipped
        summary = {"event": "epoch", "epoch": epoch, "steps": self.step, "skipped_videos": skipped,
                   "loss": totals["loss"] / max(totals["count"], 1), "acc": totals["correct"] / max(totals["count"], 1)}
        self.metrics.write(summary)
        if self.ctx.is_main:
            message = (f"epoch {epoch}: step {self.step}, loss {summary['loss']:.4f}, acc {summary['acc']:.3f}, "
                       f"{skipped} unreadable video(s) skipped")
            (self.progress.write if self.progress is not None else print)(message)

    # ------------------------------------------------------------------------- evaluation and checkpoints

    def evaluate_and_checkpoint(self) -> None:
        """After a step: a checkpoint every --checkpoint-every steps, an evaluation every --eval-every
        (the last step's are left to `finish`)."""
        args = self.args
        # The evaluation first: its data loader draws from the global RNG, and a run resumed from
        # this step's checkpoint must continue from the state after that draw.
        if args.eval_every and self.step % args.eval_every == 0 and self.step < self.total_steps:
            self.last_eval = self.held_out()
            self.model.train()
        if args.checkpoint_every and self.step % args.checkpoint_every == 0 and self.step < self.stop:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Everything the run needs to continue bit for bit. Collective: every process calls it."""
        args, ctx = self.args, self.ctx
        self._check_readable()
        model_state, optim_state = distributed.full_state_dicts(self.model, self.optimizer, ctx)
        rngs = [rng_state()]
        if ctx.distributed:
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if ctx.is_main:
            save_checkpoint({
                "model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs, "step": self.step, "model_spec": self.spec,
                "classes": self.classes,
                "data": {"num_frames": args.num_frames, "img_size": args.img_size, "mean": list(args.mean),
                         "std": list(args.std)},
                "args": vars(args), "world_size": ctx.world_size,
            }, self.ckpt_path)

    def _check_readable(self) -> None:
        """UserError when every training clip tried so far, on every process, was unreadable.
        Collective until some clip has been read."""
        if self.readable_seen:
            return
        read, skipped = distributed.all_reduce_sum([self.clips_read, self.clips_skipped], self.ctx)
        if read:
            self.readable_seen = True
        elif skipped:
            first = f" (first: {self.first_unreadable})" if self.first_unreadable else ""
            raise UserError(f"--train-csv {self.args.train_csv}: none of the {int(skipped)} training videos tried "
                            f"could be decoded{first}; nothing was trained and no checkpoint written", INPUT)

    def held_out(self) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        result = evaluate(self.model, self.val_set, self.ctx, batch_size=max(1, self.micro),
                          precision=self.args.precision, workers=self.args.workers)
        if not result["clips"] and result["skipped"]:
            raise UserError(f"--val-csv {self.args.val_csv}: none of its {int(result['skipped'])} videos could be "
                            "decoded (each is named in a warning above)", INPUT)
        self.metrics.write({"event": "eval", "step": self.step, **result})
        return result

    def finish(self, elapsed: float) -> dict[str, Any]:
        """The final checkpoint, the held-out evaluation of a finished run, and the run's summary."""
        ctx = self.ctx
        self.checkpoint()
        finished = self.step >= self.total_steps
        if finished:
            self.last_eval = self.held_out()
        divergence = distributed.max_param_divergence(self.model, ctx)
        summary = {"event": "summary", "steps": self.step, "total_steps": self.total_steps, "finished": finished,
                   "world_size": ctx.world_size, "seconds": elapsed, "clips_per_s": self.run_clips / max(elapsed, 1e-9),
                   "memory_mb": memory_mb(ctx.device), "skipped_videos": self.skipped_total,
                   "max_param_divergence_across_ranks": divergence, "checkpoint": str(self.ckpt_path)}
        if self.last_eval is not None:
            summary.update({f"val_{key}": value for key, value in self.last_eval.items()})
        self.metrics.write(summary)
        if ctx.is_main:
            with open(self.out_dir / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
            print(format_summary(summary))
        return summary
