"""`vivit-eval`: top-1 / top-5 of a checkpoint on a CSV of videos (multi-view) or the built-in data.

Multi-view evaluation as in ViViT: each video gives temporal_views x spatial_crops clips
(4 x 3 by default), the model's logits are averaged over them, and the average is scored.
"""

from __future__ import annotations

import argparse
import sys

from .. import distributed
from ..data import SYNTHETIC_CLASSES, MovingShapes, VideoFolder
from ..run.evaluation import PRECISIONS, evaluate, saved_bytes_report
from .common import (
    INPUT,
    Range,
    UserError,
    add_debug_flag,
    check_ranges,
    existing_path,
    load_checked,
    resolve_device,
    run,
)

_RANGES = {
    "synthetic_clips": Range(1),
    "temporal_views": Range(1),
    "spatial_crops": Range(1),
    "batch_size": Range(1),
    "workers": Range(0),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vivit-eval", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vivit-train")
    p.add_argument("--csv", help="videos to score: a CSV of path,label rows (default: built-in held-out data)")
    p.add_argument("--data-root", help="directory the CSV paths are relative to")
    p.add_argument("--synthetic-clips", type=int, default=512, help="built-in data: held-out clips")
    p.add_argument("--temporal-views", type=int, default=4)
    p.add_argument("--spatial-crops", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch (each with all its views)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--saved-bytes",
        action="store_true",
        help="also report bytes saved for backward: fused kernels vs naive attention",
    )
    add_debug_flag(p)
    return p


def evaluate_checkpoint(args: argparse.Namespace) -> None:
    """`vivit-eval` once its arguments are parsed."""
    check_ranges(args, _RANGES)
    existing_path(args.csv, "csv")
    existing_path(args.data_root, "data_root", "directory")
    device = resolve_device(args.device)
    model, state = load_checked(args.checkpoint, device)
    data, classes = state["data"], list(state["classes"])
    if args.csv:
        # Labels must be the checkpoint's: a label it does not know is an error naming the CSV line.
        dataset = VideoFolder(
            args.csv,
            root=args.data_root,
            classes=classes,
            train=False,
            num_frames=data["num_frames"],
            size=data["img_size"],
            mean=data["mean"],
            std=data["std"],
            temporal_views=args.temporal_views,
            spatial_crops=args.spatial_crops,
        )
    else:
        if classes != list(SYNTHETIC_CLASSES):
            shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
            raise UserError(
                f"--checkpoint {args.checkpoint} was trained on {len(classes)} classes ({shown}), not the "
                f"built-in data's {len(SYNTHETIC_CLASSES)}: pass --csv with videos of its classes"
            )
        seed = state.get("args", {}).get("data_seed", 0) + 1  # the held-out seed of training
        dataset = MovingShapes(
            args.synthetic_clips,
            num_frames=data["num_frames"],
            size=data["img_size"],
            seed=seed,
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )
    ctx = distributed.Context(device=device)
    result = evaluate(model, dataset, ctx, batch_size=args.batch_size, precision=args.precision, workers=args.workers)
    if not result["clips"]:
        raise UserError(
            f"--csv {args.csv}: none of its {int(result['skipped'])} videos could be decoded (each is "
            "named in a warning above)",
            INPUT,
        )
    print(
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  on {int(result['clips'])} videos "
        f"({result['clips_per_s']:.1f} videos/s)"
        + (f", {int(result['skipped'])} unreadable skipped" if result["skipped"] else "")
    )
    if args.saved_bytes:
        item = next(video for video in (dataset[i]["video"] for i in range(len(dataset))) if video is not None)
        clip = (item if item.dim() == 5 else item[None])[:1]
        report = saved_bytes_report(state["model_spec"], clip.to(device))
        mib = 2**20
        print(f"bytes saved for backward ('{report['fused_backend']}' kernels vs naive attention):")
        for key, what in (
            ("model", "this model, one clip"),
            ("vivit_b_layer", "one ViViT-B model-4 attention layer, 16x196 tokens"),
        ):
            fused, naive = report[f"fused_{key}"], report[f"naive_{key}"]
            print(f"  {what}: {fused / mib:.2f} MiB vs {naive / mib:.2f} MiB ({naive / max(fused, 1):.2f}x)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    run("vivit-eval", build_parser(), evaluate_checkpoint, argv)


if __name__ == "__main__":
    main()
