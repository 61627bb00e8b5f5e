"""`vivit-train` / `python -m vivit.train`: train a ViViT on a video folder or the built-in data.

One process, or many under `torchrun --nproc_per_node=K -m vivit.train ...` (DDP, or FSDP with
`--fsdp`). `--batch-size` is the global batch: each of K processes takes batch / K clips per
step (divided again by `--accum-steps`), so hyperparameters do not change with K.
Only the main process writes checkpoints, metrics and progress.

Exit statuses: 0 trained (or stopped at --stop-at), 2 a mistake in the command line, 1 one in an
input, 3 a non-finite loss or gradients (DIVERGED), 4 a checkpoint that could not be written
(WRITE_FAILED), 75 stopped by SIGTERM or SIGUSR1 with a checkpoint to resume from (STOPPED).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import torch

from .. import distributed
from ..config import BLOCK_MEMORY
from ..data import IMAGE_MEAN, IMAGE_STD
from ..planning import MEMORY_MARGIN, budget_argument
from ..run.evaluation import PRECISIONS
from ..run.trainer import Trainer
from .common import STOPPED, add_debug_flag, check_device, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vivit-train", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    m.add_argument(
        "--variant",
        default="factorised_dot_product",
        choices=["spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product"],
    )
    m.add_argument(
        "--preset",
        default="vivit_b",
        choices=["vivit_b", "vivit_l", "vivit_h"],
        help="backbone size; --dim/--depth/--heads/--mlp-ratio override it (a custom size)",
    )
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--temporal-depth", type=int, help="model 2: blocks of the temporal encoder")
    m.add_argument("--tubelet", type=int, nargs=3, metavar=("T", "H", "W"))
    m.add_argument("--tokeniser", default="tubelet", choices=["tubelet", "uniform"])
    m.add_argument(
        "--pretrained",
        help="weights to start from: an image ViT (timm or Hugging Face), or a video "
        "model to fine-tune (a Hugging Face ViViT save_pretrained directory or a vivit-train checkpoint)",
    )
    m.add_argument(
        "--init",
        default="central_frame",
        choices=["central_frame", "inflate"],
        help="tubelet initialisation from the 2D patch embedding",
    )
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    m.add_argument("--dropout", type=float, default=0.0)
    m.add_argument("--backend", default="auto", help="vivit_kernels backend of the model's ops")
    m.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    m.add_argument(
        "--memory",
        default="default",
        choices=list(BLOCK_MEMORY),
        help="what each block keeps for backward, the same results at every setting: lean recomputes "
        "LayerNorm and GELU (10 of 16 D per token kept), recompute_mlp also the MLP's first product (6), "
        "checkpoint the whole block (1); python -m vivit.memory_report counts each",
    )
    m.add_argument(
        "--memory-budget",
        type=budget_argument,
        metavar="SIZE",
        help="fit the step to this much memory (e.g. 22GiB, 512MiB; auto: the GPU's free memory, or the "
        "memory available on a CPU): the cheapest per-block --memory policies, else micro-batches with "
        "accumulation; prints the plan and writes memory_plan.json",
    )
    m.add_argument(
        "--memory-margin",
        type=float,
        default=MEMORY_MARGIN,
        metavar="FRACTION",
        help="with --memory-budget: the fraction of the budget kept free, in [0, 0.5) (the predicted peak "
        "can fall a little short of the real one)",
    )

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
    r.add_argument(
        "--checkpoint-minutes",
        type=float,
        help="also checkpoint after a step that ends this many minutes after the last checkpoint",
    )
    r.add_argument(
        "--resume",
        help="a checkpoint to continue from, or 'auto' (OUTPUT_DIR/checkpoint.pt if present; "
        "the default in a worker torchrun restarted)",
    )
    r.add_argument(
        "--max-bad-steps",
        type=int,
        default=0,
        help="steps in a row with a non-finite loss or gradients to skip (no optimiser step) before "
        "the run stops (0: stop at the first)",
    )
    r.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint (a planned interruption)")
    r.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (0: at the end)")
    r.add_argument("--log-every", type=int, default=10, help="steps between metrics lines")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--fsdp", action="store_true", help="shard parameters over processes (ViViT-L/H) instead of DDP")
    r.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")
    r.add_argument("--threads", type=int, help="CPU threads per process (torch.set_num_threads)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(r)
    return p


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run training as `args` says; returns the final summary (also written to summary.json).

    Raises UserError (vivit.cli.common) for a mistake in the arguments or inputs: before the first step,
    except for videos that turn out unreadable when decoded."""
    check_device(args.device)
    ctx = distributed.setup(args.device, args.dist_timeout)
    threads = torch.get_num_threads()
    clean = False
    try:
        summary = Trainer(args, ctx).run()
        clean = True
        return summary
    finally:
        torch.set_num_threads(threads)  # --threads holds for this run only
        distributed.teardown(clean)


def _train_command(args: argparse.Namespace) -> None:
    """`train`, ending with exit status STOPPED when a signal stopped the run."""
    if train(args)["stopped_by"]:
        raise SystemExit(STOPPED)


def main(argv: list[str] | None = None) -> None:
    if argv is not None or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        run("vivit-train", build_parser(), _train_command, argv)
        return
    # A process of a distributed run: the process group is destroyed and every file is closed;
    # skip interpreter finalisation, where gloo's worker threads can still abort or hang the
    # process, whatever the exit status.
    try:
        run("vivit-train", build_parser(), _train_command, argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
