"""`vivit-eval`: top-1 / top-5 of a checkpoint on a CSV of videos (multi-view) or the built-in data.

Multi-view evaluation as in ViViT: each video gives temporal_views x spatial_crops clips
(4 x 3 by default), the model's logits are averaged over them, and the average is scored.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader

from . import distributed
from .checkpoint import load_checkpoint
from .data import DataError, MovingShapes, ShardedSampler, VideoFolder, collate


@torch.no_grad()
def predict_logits(model: torch.nn.Module, video: torch.Tensor, views_per_call: int | None = None) -> torch.Tensor:
    """Logits averaged over views. video: (B, C, T, H, W) -> (B, K), or (B, V, C, T, H, W) -> (B, K)."""
    if video.dim() == 5:
        return model(video).float()
    B, V = video.shape[:2]
    logits = model(video.flatten(0, 1)).float()  # (B * V, K)
    return logits.view(B, V, -1).mean(1)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    ctx: distributed.Context | None = None,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    workers: int = 0,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy over `dataset` (its items' "video" may hold several views).

    Under DDP each process scores its shard with its own replica and the counts are summed;
    under FSDP (collective forwards) the shards are padded to equal length, so up to
    world_size - 1 videos count twice. Returns {"top1", "top5", "clips", "skipped", "clips_per_s"}.
    """
    ctx = ctx or distributed.Context()
    fsdp = ctx.distributed and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
    net = distributed.unwrap(model)
    was_training = net.training
    net.eval()
    # Without FSDP each video is scored once (no padding); FSDP needs equal shards.
    sampler = ShardedSampler(len(dataset), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=fsdp)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(ctx.device.type, dtype=dtype)) if dtype is not None else nullcontext
    top1 = top5 = count = skipped = 0
    start = time.perf_counter()
    for batch in loader:
        for path, reason in batch["skipped"]:
            warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=1)
        skipped += len(batch["skipped"])
        if batch["video"] is None:
            continue
        video, labels = batch["video"].to(ctx.device), batch["label"].to(ctx.device)
        with autocast():
            logits = predict_logits(model if fsdp else net, video)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(-1).sum().item()
        count += labels.numel()
    elapsed = time.perf_counter() - start
    top1, top5, count, skipped = distributed.all_reduce_sum([top1, top5, count, skipped], ctx)
    net.train(was_training)
    return {"top1": top1 / max(count, 1), "top5": top5 / max(count, 1), "clips": count, "skipped": skipped,
            "clips_per_s": count / max(elapsed, 1e-9)}


def saved_bytes_report(spec: dict[str, Any], video: torch.Tensor) -> dict[str, int | str]:
    """Bytes autograd keeps for backward, with the kernels "auto" picks ("fused_*") and with the
    naive einsum attention ("naive_*"): for one training forward of the model of `spec` on
    `video`, and for one model-4 attention layer of ViViT-B at the paper's input (32 frames of
    224 x 224 in 2 x 16 x 16 tubelets: 16 x 196 tokens, 12 heads of 64)."""
    from vivit_kernels import FactorisedAttention, backends, saved_bytes

    from .train import build_model

    tokens = torch.randn(1, 16, 196, 768, device=video.device, requires_grad=True)
    report: dict[str, int | str] = {}
    for name, backend in (("fused", "auto"), ("naive", "reference")):
        torch.manual_seed(0)
        model = build_model(spec, backend=backend, drop_rate=0.0, drop_path_rate=0.0).to(video.device).train()
        report[f"{name}_model"] = saved_bytes(model, video)
        layer = FactorisedAttention(768, 12, mode="split", backend=backend).to(video.device)
        report[f"{name}_vivit_b_layer"] = saved_bytes(layer, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = backends.select(backends.Request("attention", video.device, video.dtype), "auto")
    report["fused_backend"] = next(n for n in backends.names() if backends.get(n).ops.get("attention") is chosen)
    return report


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """A model rebuilt from a `vivit-train` checkpoint, in eval mode; and the checkpoint."""
    from .train import build_model

    state = load_checkpoint(path)
    model = build_model(state["model_spec"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="vivit-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by vivit-train")
    p.add_argument("--csv", help="videos to score: a CSV of path,label rows (default: built-in held-out data)")
    p.add_argument("--data-root", help="directory the CSV paths are relative to")
    p.add_argument("--synthetic-clips", type=int, default=512, help="built-in data: held-out clips")
    p.add_argument("--temporal-views", type=int, default=4)
    p.add_argument("--spatial-crops", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch (each with all its views)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--saved-bytes", action="store_true",
                   help="also report bytes saved for backward: fused kernels vs naive attention")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, state = load_model(args.checkpoint, device)
    data = state["data"]
    try:
        if args.csv:
            dataset = VideoFolder(args.csv, root=args.data_root, classes=state["classes"], train=False,
                                  num_frames=data["num_frames"], size=data["img_size"], mean=data["mean"],
                                  std=data["std"], temporal_views=args.temporal_views,
                                  spatial_crops=args.spatial_crops)
        else:
            seed = state["args"].get("data_seed", 0) + 1  # the held-out seed of training
            dataset = MovingShapes(args.synthetic_clips, num_frames=data["num_frames"], size=data["img_size"],
                                   seed=seed, mean=tuple(data["mean"]), std=tuple(data["std"]))
    except DataError as error:
        raise SystemExit(f"vivit-eval: error: {error}") from None
    ctx = distributed.Context(device=device)
    result = evaluate(model, dataset, ctx, batch_size=args.batch_size, precision=args.precision,
                      workers=args.workers)
    print(f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%  on {int(result['clips'])} videos "
          f"({result['clips_per_s']:.1f} videos/s)" + (f", {int(result['skipped'])} unreadable skipped"
                                                        if result["skipped"] else ""))
    if args.saved_bytes:
        item = dataset[0]["video"]
        clip = (item if item.dim() == 5 else item[None])[:1]
        report = saved_bytes_report(state["model_spec"], clip.to(device))
        mib = 2**20
        print(f"bytes saved for backward ('{report['fused_backend']}' kernels vs naive attention):")
        for key, what in (("model", "this model, one clip"),
                          ("vivit_b_layer", "one ViViT-B model-4 attention layer, 16x196 tokens")):
            fused, naive = report[f"fused_{key}"], report[f"naive_{key}"]
            print(f"  {what}: {fused / mib:.2f} MiB vs {naive / mib:.2f} MiB ({naive / max(fused, 1):.2f}x)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
