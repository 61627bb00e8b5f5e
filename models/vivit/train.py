"""`vivit-train` / `python -m vivit.train`: train a ViViT on a video folder or the built-in data.

One process, or many under `torchrun --nproc_per_node=K -m vivit.train ...` (DDP, or FSDP with
`--fsdp`). `--batch-size` is the global batch: each of K processes takes batch / K clips per
step (divided again by `--accum-steps`), so hyperparameters do not change with K.
Only the main process writes checkpoints, metrics and progress.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
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

from . import distributed
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import IMAGE_MEAN, IMAGE_STD, MovingShapes, ShardedSampler, VideoFolder, collate

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vivit-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data (no --train-csv: the built-in moving-shapes data)")
    d.add_argument("--train-csv", help="training videos: a CSV of path,label rows")
    d.add_argument("--val-csv", help="held-out videos (same format), evaluated multi-view")
    d.add_argument("--data-root", help="directory the CSV paths are relative to (default: the CSV's directory)")
    d.add_argument("--synthetic-clips", type=int, default=4096, help="built-in data: training clips")
    d.add_argument("--synthetic-val-clips", type=int, default=512, help="built-in data: held-out clips")
    d.add_argument("--data-seed", type=int, default=0, help="built-in data: training seed (held-out uses seed + 1)")
    d.add_argument("--num-frames", type=int, help="frames per clip (default: 32 for videos, 8 built-in)")
    d.add_argument("--img-size", type=int, help="crop size (default: 224 for videos, 32 built-in)")
    d.add_argument("--mean", type=float, nargs=3, default=IMAGE_MEAN, help="normalisation of the image model")
    d.add_argument("--std", type=float, nargs=3, default=IMAGE_STD)
    d.add_argument("--no-flip", action="store_true", help="no horizontal flips in training")
    d.add_argument("--temporal-views", type=int, default=4, help="evaluation clips per video")
    d.add_argument("--spatial-crops", type=int, default=3, help="evaluation crops per clip")
    d.add_argument("--workers", type=int, help="data-loader processes (default: 0 built-in, 4 for videos)")

    m = p.add_argument_group("model")
    m.add_argument("--variant", default="factorised_dot_product",
                   choices=["spatio_temporal", "factorised_encoder", "factorised_self_attention",
                            "factorised_dot_product"])
    m.add_argument("--preset", default="vivit_b", choices=["vivit_b", "vivit_l", "vivit_h"],
                   help="backbone size; --dim/--depth/--heads/--mlp-ratio override it (a custom size)")
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--temporal-depth", type=int, help="model 2: blocks of the temporal encoder")
    m.add_argument("--tubelet", type=int, nargs=3, metavar=("T", "H", "W"))
    m.add_argument("--tokeniser", default="tubelet", choices=["tubelet", "uniform"])
    m.add_argument("--pretrained", help="image ViT checkpoint (timm layout) to initialise from")
    m.add_argument("--init", default="central_frame", choices=["central_frame", "inflate"],
                   help="tubelet initialisation from the 2D patch embedding")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--backend", default="auto", help="vivit_kernels backend of the model's ops")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine schedule")
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    o.add_argument("--clip-grad", type=float, help="max gradient norm")
    o.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="bf16/fp16 autocast on GPU")
    o.add_argument("--batch-size", type=int, default=32, help="global batch (all processes, all accumulation steps)")
    o.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per step")
    o.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    o.add_argument("--epochs", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("run")
    r.add_argument("--output-dir", default="runs/vivit", help="checkpoint.pt, metrics.jsonl, summary.json")
    r.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (0: only at the end)")
    r.add_argument("--resume", help="a checkpoint to continue from, or 'auto' (OUTPUT_DIR/checkpoint.pt if present)")
    r.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (a planned interruption)")
    r.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: at the end)")
    r.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--fsdp", action="store_true", help="shard parameters over processes (ViViT-L/H) instead of DDP")
    r.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    r.add_argument("--threads", type=int, help="CPU threads per process (torch.set_num_threads)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args: argparse.Namespace, ctx: distributed.Context) -> None:
    def fail(message: str) -> None:
        raise SystemExit(f"vivit-train: error: {message}")

    per_step = ctx.world_size * args.accum_steps
    if args.batch_size < 1 or args.batch_size % per_step:
        fail(f"--batch-size {args.batch_size} must be a positive multiple of processes x --accum-steps = {per_step}")
    if args.precision == "fp16" and ctx.device.type != "cuda":
        fail("--precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    if args.steps is not None and args.steps < 1:
        fail(f"--steps must be positive, got {args.steps}")
    if args.val_csv and not args.train_csv:
        fail("--val-csv needs --train-csv (its labels define the classes)")


# ----------------------------------------------------------------------------- model


def model_spec(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """What `create_model` needs to rebuild this model: stored in every checkpoint."""
    overrides: dict[str, Any] = dict(img_size=args.img_size, num_frames=args.num_frames, tokeniser=args.tokeniser,
                                     drop_rate=args.dropout, drop_path_rate=args.drop_path, backend=args.backend)
    for arg, field in (("dim", "dim"), ("depth", "depth"), ("heads", "num_heads"), ("mlp_ratio", "mlp_ratio"),
                       ("temporal_depth", "temporal_depth")):
        if getattr(args, arg) is not None:
            overrides[field] = getattr(args, arg)
    if args.tubelet is not None:
        overrides["tubelet"] = tuple(args.tubelet)
    return {"preset": args.preset, "variant": args.variant, "num_classes": num_classes, "overrides": overrides}


def build_model(spec: dict[str, Any], **changes) -> torch.nn.Module:
    """A model from a `model_spec` (e.g. a checkpoint's), with `changes` to its overrides."""
    from . import create_model

    return create_model(spec["preset"], variant=spec["variant"], num_classes=spec["num_classes"],
                        **{**spec["overrides"], **changes})


# ----------------------------------------------------------------------------- data


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
    train = MovingShapes(args.synthetic_clips, seed=args.data_seed, **common)
    val = None
    if args.synthetic_val_clips:
        val = MovingShapes(args.synthetic_val_clips, seed=args.data_seed + 1, **common)
    return train, val, list(MovingShapes.classes)


def make_loader(dataset, batch_size: int, sampler: ShardedSampler, workers: int, seed: int = 0) -> DataLoader:
    # A private generator: creating an iterator must not draw from the global RNG, or a run
    # resumed mid-epoch (one more iterator) would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=False, persistent_workers=False, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- optimisation


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


# ----------------------------------------------------------------------------- the loop


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as `args` says; returns the final summary (also written to summary.json)."""
    ctx = distributed.setup(args.device, args.dist_timeout)
    threads = torch.get_num_threads()
    try:
        return _train(args, ctx)
    finally:
        torch.set_num_threads(threads)  # --threads holds for this run only
        distributed.teardown()


def _train(args: argparse.Namespace, ctx: distributed.Context) -> dict[str, Any]:
    from .evaluate import evaluate

    builtin = not args.train_csv
    args.num_frames = args.num_frames or (8 if builtin else 32)
    args.img_size = args.img_size or (32 if builtin else 224)
    if args.workers is None:
        args.workers = 0 if builtin else min(4, os.cpu_count() or 1)
    check_args(args, ctx)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out_dir / "metrics.jsonl" if ctx.is_main else None)

    train_set, val_set, classes = build_datasets(args)  # a bad CSV fails here, before any step
    spec = model_spec(args, len(classes))
    seed_everything(args.seed)  # the same initial weights on every process
    model = build_model(spec)
    if args.pretrained:
        from . import load_image_pretrained

        report = load_image_pretrained(model, args.pretrained, tubelet_init=args.init)
        if ctx.is_main:
            print(f"initialised from {args.pretrained} ({args.init}): {report}", file=sys.stderr)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(ctx.device)
    model = distributed.wrap(model, ctx, "fsdp" if args.fsdp else "ddp")
    optimizer = make_optimizer(args, model)

    micro = args.batch_size // (ctx.world_size * args.accum_steps)  # clips per process per micro-step
    sampler = ShardedSampler(len(train_set), shuffle=True, seed=args.seed, rank=ctx.rank, world_size=ctx.world_size)
    items_per_step = micro * args.accum_steps  # per process
    steps_per_epoch = sampler.per_rank // items_per_step
    if steps_per_epoch < 1:
        raise SystemExit(
            f"vivit-train: error: {len(train_set)} training clips do not fill one batch of {args.batch_size}")
    total_steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    scheduler = make_scheduler(args, optimizer, total_steps)
    dtype = PRECISIONS[args.precision]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.precision == "fp16")
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype is not None else nullcontext

    step = 0
    ckpt_path = out_dir / "checkpoint.pt"
    resume = args.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if ctx.is_main and not resume and metrics.path.exists():
        metrics.path.unlink()  # a fresh run starts a fresh record
    if resume:
        state = load_checkpoint(resume)
        distributed.load_full_state_dicts(model, optimizer, state["model"], state["optimizer"], ctx)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        rngs = state["rng"]
        set_rng_state(rngs[ctx.rank] if len(rngs) == ctx.world_size else rngs[0])
        if ctx.is_main:
            print(f"resumed from {resume} at step {step}", file=sys.stderr)
    else:
        seed_everything(args.seed + ctx.rank)  # dropout, drop-path and mixup differ across processes

    def checkpoint() -> None:
        model_state, optim_state = distributed.full_state_dicts(model, optimizer, ctx)
        rngs = [rng_state()]
        if ctx.distributed:
            rngs = [None] * ctx.world_size
            torch.distributed.all_gather_object(rngs, rng_state())
        if ctx.is_main:
            save_checkpoint({
                "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "step": step, "model_spec": spec, "classes": classes,
                "data": {"num_frames": args.num_frames, "img_size": args.img_size, "mean": list(args.mean),
                         "std": list(args.std)},
                "args": vars(args), "world_size": ctx.world_size,
            }, ckpt_path)

    def held_out() -> dict[str, float] | None:
        if val_set is None:
            return None
        result = evaluate(model, val_set, ctx, batch_size=max(1, micro), precision=args.precision,
                          workers=args.workers)
        metrics.write({"event": "eval", "step": step, **result})
        return result

    progress = None
    if ctx.is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    stop = min(total_steps, args.stop_at) if args.stop_at else total_steps
    num_classes = len(classes)
    skipped_total, warned = 0, set()
    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "clips": 0.0}
    run_start = time.perf_counter()
    window_start, run_clips = run_start, 0.0
    epoch_stats = {"loss": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0, "steps": 0}
    last_eval: dict[str, float] | None = None
    model.train()

    while step < stop:
        epoch, position = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, position * items_per_step)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        batches = iter(make_loader(train_set, micro, sampler, args.workers, args.seed + epoch))
        while position < steps_per_epoch and step < stop:
            optimizer.zero_grad(set_to_none=True)
            for micro_step in range(args.accum_steps):
                batch = next(batches)
                for path, reason in batch["skipped"]:
                    epoch_stats["skipped"] += 1
                    if path not in warned:
                        warned.add(path)
                        warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=1)
                ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
                sync = micro_step == args.accum_steps - 1 or not ddp  # DDP all-reduces on the last micro-step only
                with nullcontext() if sync else model.no_sync():
                    if batch["video"] is None:
                        # Every clip of this micro-batch was unreadable: a forward and backward
                        # of a blank clip with zero weight keeps the processes' collectives in step.
                        blank = torch.zeros(1, 3, args.num_frames, args.img_size, args.img_size, device=ctx.device)
                        with autocast():
                            loss = model(blank).float().sum() * 0.0
                        scaler.scale(loss).backward()
                        continue
                    video = batch["video"].to(ctx.device, non_blocking=True)
                    labels = batch["label"].to(ctx.device, non_blocking=True)
                    with autocast():
                        if args.mixup > 0:
                            video, soft = mixup(video, labels, num_classes, args.mixup, args.label_smoothing)
                            logits = model(video)
                            loss = torch.sum(-soft * F.log_softmax(logits.float(), -1), -1).mean()
                        else:
                            logits = model(video)
                            loss = F.cross_entropy(logits.float(), labels, label_smoothing=args.label_smoothing)
                    scaler.scale(loss / args.accum_steps).backward()
                n = labels.shape[0]
                window["loss"] += loss.item() * n
                window["correct"] += (logits.argmax(-1) == labels).sum().item()
                window["count"] += n
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            position += 1

            log_now = step % args.log_every == 0 or step == stop
            if log_now or progress is not None:
                loss_sum, correct, count = distributed.all_reduce_sum(
                    [window["loss"], window["correct"], window["count"]], ctx) if log_now else (
                    window["loss"], window["correct"], window["count"])
                now = time.perf_counter()
                clips_per_s = count * (ctx.world_size if not log_now else 1) / max(now - window_start, 1e-9)
                record = {"step": step, "epoch": epoch, "loss": loss_sum / max(count, 1),
                          "acc": correct / max(count, 1), "lr": scheduler.get_last_lr()[0],
                          "clips_per_s": clips_per_s, "memory_mb": memory_mb(ctx.device)}
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                         clips_s=f"{clips_per_s:.1f}", mem=f"{record['memory_mb']:.0f}MB",
                                         refresh=False)
                if log_now:
                    metrics.write(record)
                    for key, value in (("loss", loss_sum), ("correct", correct), ("count", count)):
                        epoch_stats[key] += value
                    run_clips += count
                    window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "clips": 0.0}
                    window_start = now
            if progress is not None:
                progress.update(1)
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < stop:
                checkpoint()
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                last_eval = held_out()
                model.train()
        if position == steps_per_epoch or step == stop:
            skipped = int(distributed.all_reduce_sum([epoch_stats["skipped"]], ctx)[0])
            skipped_total += skipped
            summary = {"event": "epoch", "epoch": epoch, "steps": step, "skipped_videos": skipped,
                       "loss": epoch_stats["loss"] / max(epoch_stats["count"], 1),
                       "acc": epoch_stats["correct"] / max(epoch_stats["count"], 1)}
            metrics.write(summary)
            if ctx.is_main:
                message = (f"epoch {epoch}: step {step}, loss {summary['loss']:.4f}, acc {summary['acc']:.3f}, "
                           f"{skipped} unreadable video(s) skipped")
                (progress.write if progress is not None else print)(message)
            epoch_stats = {"loss": 0.0, "correct": 0.0, "count": 0.0, "skipped": 0.0, "steps": 0}
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - run_start

    checkpoint()
    finished = step >= total_steps
    if finished:
        last_eval = held_out()
    divergence = distributed.max_param_divergence(model, ctx)
    summary = {"event": "summary", "steps": step, "total_steps": total_steps, "finished": finished,
               "world_size": ctx.world_size, "seconds": elapsed, "clips_per_s": run_clips / max(elapsed, 1e-9),
               "memory_mb": memory_mb(ctx.device), "skipped_videos": skipped_total,
               "max_param_divergence_across_ranks": divergence, "checkpoint": str(ckpt_path)}
    if last_eval is not None:
        summary.update({f"val_{key}": value for key, value in last_eval.items()})
    metrics.write(summary)
    if ctx.is_main:
        with open(out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print(format_summary(summary))
    return summary


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


def main(argv: list[str] | None = None) -> None:
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        train(args)
    except DataError as error:
        raise SystemExit(f"vivit-train: error: {error}") from None
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The process group is destroyed and every file is closed; skip interpreter finalisation,
        # where gloo's worker threads can still abort the process after a successful run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
