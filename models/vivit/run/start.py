"""Where a run starts: the checkpoint `--resume` names, or the weights of `--pretrained`, read and
checked against the arguments before any model is built."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import RESUME_KEYS, CheckpointError, check_weights, checkpoint_config, read_training_checkpoint
from ..cli.common import INPUT, UserError
from ..config import EXECUTION_FIELDS, TRAINING_ONLY_FIELDS, ViViTConfig, config_differences, format_differences
from ..model import ViViT, config_from_spec
from .arguments import FIELD_NAMES, INHERITED_FIELDS, model_config


def read_resume(resume: str | None, ckpt_path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """(path, state) of the checkpoint --resume names ('auto': `ckpt_path`, the output directory's, if any)."""
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if not resume:
        return None, None
    try:
        return resume, read_training_checkpoint(resume, RESUME_KEYS)
    except CheckpointError as error:
        raise UserError(f"--resume {error}", INPUT) from None


def read_pretrained(path: str | None) -> tuple[dict[str, torch.Tensor] | None, ViViTConfig | None]:
    """--pretrained's weights, and the config of the video model they belong to (None: an image ViT)."""
    if not path:
        return None, None
    from ..pretrained import read_pretrained as read

    try:
        return read(path)
    except CheckpointError as error:
        raise UserError(f"--pretrained {error}", INPUT) from None
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UserError(f"--pretrained {path}: {error}", INPUT) from None


def check_video_pretrained(args: argparse.Namespace, classes: list[str], theirs: ViViTConfig) -> None:
    """A video model fine-tunes into the same architecture: only frames, frame size and classes may differ."""
    ours = model_config(args, len(classes))
    ignore = (*EXECUTION_FIELDS, *TRAINING_ONLY_FIELDS, *INHERITED_FIELDS, "num_classes", "num_frames", "img_size")
    differences = config_differences(theirs, ours, ignore=ignore)
    if differences:
        raise UserError(
            f"--pretrained {args.pretrained} is a video model other than the arguments': "
            f"{format_differences(differences, FIELD_NAMES)} (checkpoint vs arguments); pass its "
            "options to fine-tune it"
        )


def _preview(classes: list[str], shown: int = 6) -> str:
    """ "3 classes (a, b, c)", at most `shown` names."""
    names = ", ".join(classes[:shown]) + (", ..." if len(classes) > shown else "")
    return f"{len(classes)} classes ({names})"


def check_resume(
    args: argparse.Namespace, path: str, state: dict[str, Any], classes: list[str], spec: dict[str, Any]
) -> None:
    """The checkpoint at `path` continues this run: same model (`spec`), classes and optimiser, weights that fit."""
    if list(state["classes"]) != list(classes):
        raise UserError(
            f"--resume {path}: trained on {_preview(state['classes'])}, but the training data has {_preview(classes)}"
        )
    theirs, ours = checkpoint_config(state, path), config_from_spec(spec)
    differences = config_differences(theirs, ours)
    if theirs.variant != ours.variant:  # the pooling follows from the variant: naming it too says nothing
        differences = [d for d in differences if d[0] != "pooling"]
    if differences:
        raise UserError(
            f"--resume {path}: the checkpoint's model differs from the arguments': "
            f"{format_differences(differences, FIELD_NAMES)} (checkpoint vs arguments); resume with "
            "the options it was trained with"
        )
    saved = state.get("args", {}).get("optimizer") if isinstance(state.get("args"), dict) else None
    if saved is not None and saved != args.optimizer:
        raise UserError(f"--optimizer {args.optimizer}: --resume {path} holds the state of {saved}")
    with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
        expected = ViViT(ours).state_dict()
    try:
        check_weights(state["model"], expected, path)
    except CheckpointError as error:
        raise UserError(f"--resume {error}", INPUT) from None


def load_pretrained(
    model: ViViT, args: argparse.Namespace, weights: dict[str, torch.Tensor], video: ViViTConfig | None, announce: bool
) -> None:
    """Initialise `model` from --pretrained's `weights`: a video model's (`video`: its config) or an
    image ViT's (by --init); `announce`: say so on stderr (the main process)."""
    from ..pretrained import load_image_pretrained, load_video_pretrained

    try:
        if video is not None:
            report = load_video_pretrained(model, weights, video)
            how = f"a {video.variant} video model, {video.num_frames} frames of {video.img_size}"
        else:
            report = load_image_pretrained(model, weights, tubelet_init=args.init)
            how = args.init
    except ValueError as error:
        raise UserError(f"--pretrained {args.pretrained}: {error}", INPUT) from None
    if announce:
        print(f"initialised from {args.pretrained} ({how}): {report}", file=sys.stderr)
