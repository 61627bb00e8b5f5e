"""`vivit-predict video.mp4 --checkpoint ckpt.pt`: the top-5 labels of one video.

Scored multi-view, as `vivit-eval` does: logits averaged over temporal_views x spatial_crops
clips, then a softmax. Prints one line per label: probability, then the label.
"""

from __future__ import annotations

import argparse

import torch

from .checkpoint import load_model
from .data.transforms import eval_transform
from .data.video import decode, temporal_view_indices
from .evaluation import predict_logits


def predict(model: torch.nn.Module, path: str, data: dict, classes: list[str], *, top: int = 5,
            temporal_views: int = 4, spatial_crops: int = 3) -> list[tuple[str, float]]:
    """[(label, probability)] of the `top` most likely classes of the video at `path`."""
    from .data.decoding import read_frames

    # The views' frames in one decode of only those frames; all cores for a single video.
    T = data["num_frames"]
    frames, _ = read_frames(path, lambda count: torch.cat(temporal_view_indices(count, T, temporal_views)), threads=0)
    views = [eval_transform(frames[j * T : (j + 1) * T], data["img_size"], spatial_crops, mean=data["mean"],
                            std=data["std"]) for j in range(temporal_views)]
    device = next(model.parameters()).device
    logits = predict_logits(model, torch.cat(views)[None].to(device))[0]
    probs = logits.softmax(-1)
    best = probs.topk(min(top, probs.numel()))
    return [(classes[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vivit-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("video", help="a video file")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vivit-train")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--temporal-views", type=int, default=4)
    p.add_argument("--spatial-crops", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    model, state = load_model(args.checkpoint, device)
    try:
        ranked = predict(model, args.video, state["data"], state["classes"], top=args.top,
                         temporal_views=args.temporal_views, spatial_crops=args.spatial_crops)
    except FileNotFoundError as error:
        raise SystemExit(f"vivit-predict: error: {error}") from None
    for label, prob in ranked:
        print(f"{prob:.4f}  {label}")


if __name__ == "__main__":
    main()
