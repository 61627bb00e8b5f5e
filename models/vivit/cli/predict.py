"""`vivit-predict video.mp4 --checkpoint ckpt.pt`: the top-5 labels of one video.

Scored multi-view, as `vivit-eval` does: logits averaged over temporal_views x spatial_crops
clips, then a softmax. Prints one line per label: probability, then the label.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..data.decoding import backend_unavailable_reason
from ..data.transforms import eval_transform
from ..data.video import temporal_view_indices
from ..run.evaluation import predict_logits
from .common import INPUT, Range, UserError, add_debug_flag, check_ranges, load_checked, resolve_device, run


def predict(
    model: torch.nn.Module,
    path: str,
    data: dict,
    classes: list[str],
    *,
    top: int = 5,
    temporal_views: int = 4,
    spatial_crops: int = 3,
) -> list[tuple[str, float]]:
    """[(label, probability)] of the `top` most likely classes of the video at `path`."""
    from ..data.decoding import read_frames

    # The views' frames in one decode of only those frames; all cores for a single video.
    T = data["num_frames"]
    frames, _ = read_frames(path, lambda count: torch.cat(temporal_view_indices(count, T, temporal_views)), threads=0)
    views = [
        eval_transform(frames[j * T : (j + 1) * T], data["img_size"], spatial_crops, mean=data["mean"], std=data["std"])
        for j in range(temporal_views)
    ]
    device = next(model.parameters()).device
    logits = predict_logits(model, torch.cat(views)[None].to(device))[0]
    probs = logits.softmax(-1)
    best = probs.topk(min(top, probs.numel()))
    return [(classes[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist())]


def check_video_file(path: str) -> None:
    """UserError unless `path` is a file PyAV opens, with a video stream whose first frame decodes:
    a missing, empty, corrupt or non-video file is named before the model is loaded."""
    import av

    file = Path(path)
    if not file.exists():
        raise UserError(f"video {path}: no such file")
    if not file.is_file():
        raise UserError(f"video {path}: not a file (expected a video file)")
    if file.stat().st_size == 0:
        raise UserError(f"video {path}: empty file (0 bytes), not a video", INPUT)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise UserError(f"video {path}: has no video stream", INPUT)
            next(container.decode(video=0))
    except (av.FFmpegError, OSError, EOFError) as error:
        raise UserError(f"video {path}: cannot be decoded ({type(error).__name__}: {error})", INPUT) from None
    except StopIteration:
        raise UserError(f"video {path}: no frame decodes", INPUT) from None


def predict_file(args: argparse.Namespace) -> None:
    """`vivit-predict` once its arguments are parsed."""
    check_ranges(args, _RANGES)
    reason = backend_unavailable_reason("pyav")
    if reason:
        raise UserError(f"video {args.video}: cannot be read: {reason}")
    import av

    device = resolve_device(args.device)
    check_video_file(args.video)
    model, state = load_checked(args.checkpoint, device)
    try:
        ranked = predict(
            model,
            args.video,
            state["data"],
            list(state["classes"]),
            top=args.top,
            temporal_views=args.temporal_views,
            spatial_crops=args.spatial_crops,
        )
    except (av.FFmpegError, OSError, EOFError, ValueError) as error:
        # A file that breaks after its first frame: the decoder's errors. The model cannot raise
        # here, as the checkpoint's clip size was checked against its model when it was loaded.
        raise UserError(f"video {args.video}: cannot be decoded ({type(error).__name__}: {error})", INPUT) from None
    for label, prob in ranked:
        print(f"{prob:.4f}  {label}")


_RANGES = {"top": Range(1), "temporal_views": Range(1), "spatial_crops": Range(1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="vivit-predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("video", help="a video file")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vivit-train")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--temporal-views", type=int, default=4)
    p.add_argument("--spatial-crops", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_debug_flag(p)
    run("vivit-predict", p, predict_file, argv)


if __name__ == "__main__":
    main()
