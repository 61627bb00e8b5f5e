"""`vivit-train`'s arguments: the defaults that depend on the data, every check of the arguments
alone (before any data or weights are read), and the model they describe."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch

from vivit_kernels import BackendUnsupportedError, attention_backend

from .. import distributed
from ..cli.common import Range, UserError, check_ranges, existing_path
from ..config import ViViTConfig
from ..model import config_from_spec, model_spec
from .evaluation import PRECISIONS


def fill_defaults(args: argparse.Namespace) -> None:
    """Defaults that depend on the data: 8 frames of 32 px built-in, 32 of 224 for videos; and
    --resume auto in a worker that torchrun restarted (--max-restarts), which must continue from
    the checkpoint its predecessor wrote, not start again from step 0."""
    builtin = not args.train_csv
    args.num_frames = args.num_frames or (8 if builtin else 32)
    args.img_size = args.img_size or (32 if builtin else 224)
    if args.workers is None:
        args.workers = 0 if builtin else min(4, os.cpu_count() or 1)
    if args.resume is None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") not in ("", "0"):
        args.resume = "auto"


# The allowed values of vivit-train's numeric options (argparse attribute names).
_RANGES = {
    "synthetic_clips": Range(1),
    "synthetic_val_clips": Range(0),
    "num_frames": Range(1),
    "img_size": Range(1),
    "std": Range(0, open_low=True),
    "temporal_views": Range(1),
    "spatial_crops": Range(1),
    "workers": Range(0),
    "dim": Range(1),
    "depth": Range(1),
    "heads": Range(1),
    "mlp_ratio": Range(0, open_low=True),
    "temporal_depth": Range(1),
    "memory_margin": Range(0, 0.5),
    "tubelet": Range(1),
    "drop_path": Range(0, 1),
    "dropout": Range(0, 1),
    "lr": Range(0),
    "momentum": Range(0),
    "weight_decay": Range(0),
    "warmup_steps": Range(0),
    "min_lr": Range(0),
    "label_smoothing": Range(0, 1),
    "mixup": Range(0),
    "clip_grad": Range(0, open_low=True),
    "batch_size": Range(1),
    "accum_steps": Range(1),
    "steps": Range(1),
    "epochs": Range(0, open_low=True),
    "checkpoint_every": Range(0),
    "checkpoint_minutes": Range(0, open_low=True),
    "max_bad_steps": Range(0),
    "stop_at": Range(1),
    "eval_every": Range(0),
    "log_every": Range(1),
    "dist_timeout": Range(0, open_low=True),
    "threads": Range(1),
}

# ViViTConfig field -> the vivit-train option (argparse attribute) that sets it.
FIELD_ARGS = {
    "variant": "variant",
    "img_size": "img_size",
    "num_frames": "num_frames",
    "tokeniser": "tokeniser",
    "drop_rate": "dropout",
    "drop_path_rate": "drop_path",
    "backend": "backend",
    "dim": "dim",
    "depth": "depth",
    "num_heads": "heads",
    "mlp_ratio": "mlp_ratio",
    "temporal_depth": "temporal_depth",
    "tubelet": "tubelet",
    "memory": "memory",
}
# How a message names a field: its option, or what sets it.
FIELD_NAMES = {**{field: "--" + arg.replace("_", "-") for field, arg in FIELD_ARGS.items()}, "num_classes": "classes"}
# Fields no option sets: a run takes them from the checkpoint it resumes or fine-tunes.
INHERITED_FIELDS = (
    "in_chans",
    "pooling",
    "mlp_activation",
    "attention_order",
    "qkv_bias",
    "norm_eps",
    "attn_drop_rate",
)


def check_args(args: argparse.Namespace, ctx: distributed.Context) -> None:
    """Every check of the arguments alone, before any data or weights are read: UserError naming the option."""
    check_ranges(args, _RANGES)
    per_step = ctx.world_size * args.accum_steps
    if args.batch_size % per_step:
        raise UserError(
            f"--batch-size {args.batch_size} must be a positive multiple of processes x --accum-steps = {per_step}"
        )
    if args.precision == "fp16" and ctx.device.type != "cuda":
        raise UserError("--precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
    if args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} must not exceed --lr {args.lr}")
    if getattr(args, "memory_budget", None) is not None:
        chosen = [
            flag
            for flag, given in (
                ("--memory", args.memory != "default"),
                ("--grad-checkpointing", args.grad_checkpointing),
                ("--accum-steps", args.accum_steps != 1),
            )
            if given
        ]
        if chosen:
            raise UserError(f"--memory-budget chooses {', '.join(chosen)} itself: pass one or the other")
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
        for field, name in FIELD_NAMES.items():  # "num_heads must", "dim=64" -> "--heads must", "--dim 64"
            message = re.sub(
                rf"\b{field}(=| must| is)", lambda m, name=name: name + (" " if m[1] == "=" else m[1]), message
            )
        raise UserError(message) from None


def check_backend(backend: str, config: ViViTConfig, device: torch.device, precision: str) -> None:
    """UserError unless `backend` names a backend that runs this model's attention on `device` at `precision`."""
    if backend == "auto":  # auto always finds one (the reference at worst)
        return
    q = torch.zeros(
        1, 2, 2, config.dim // config.num_heads, device=device, dtype=PRECISIONS[precision] or torch.float32
    )
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
    for field, arg in FIELD_ARGS.items():
        if field != "variant" and getattr(args, arg) is not None:
            overrides[field] = tuple(args.tubelet) if field == "tubelet" else getattr(args, arg)
    if inherit is not None:
        default = ViViTConfig(variant=inherit.variant)
        overrides.update(
            {
                field: getattr(inherit, field)
                for field in INHERITED_FIELDS
                if getattr(inherit, field) != getattr(default, field)
            }
        )
    return model_spec(args.preset, args.variant, num_classes, **overrides)
