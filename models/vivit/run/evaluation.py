"""Scoring a model on held-out clips: logits averaged over views, top-1 / top-5, bytes saved.

Used by training (held-out evaluation), `vivit-eval` and `vivit-predict`. Multi-view as in
ViViT: each video gives temporal_views x spatial_crops clips (4 x 3 by default), whose logits
are averaged before scoring.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader

from vivit_kernels import FactorisedAttention, attention_backend, saved_bytes

from .. import distributed
from ..data import ShardedSampler, collate
from ..model import build_model

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """A fresh autocast context for `precision` ("fp32": none)."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def predict_logits(model: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
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
    top1 = top5 = count = skipped = 0
    start = time.perf_counter()
    for batch in loader:
        for path, reason in batch["skipped"]:
            warnings.warn(f"skipping unreadable video {path} ({reason})", stacklevel=1)
        skipped += len(batch["skipped"])
        if batch["video"] is None:
            continue
        video, labels = batch["video"].to(ctx.device), batch["label"].to(ctx.device)
        with autocast(ctx.device, precision):
            logits = predict_logits(model if fsdp else net, video)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(-1).sum().item()
        count += labels.numel()
    elapsed = time.perf_counter() - start
    top1, top5, count, skipped = distributed.all_reduce_sum([top1, top5, count, skipped], ctx)
    net.train(was_training)
    return {
        "top1": top1 / max(count, 1),
        "top5": top5 / max(count, 1),
        "clips": count,
        "skipped": skipped,
        "clips_per_s": count / max(elapsed, 1e-9),
    }


def saved_bytes_report(spec: dict[str, Any], video: torch.Tensor) -> dict[str, int | str]:
    """Bytes autograd keeps for backward, with the kernels "auto" picks ("fused_*") and with the
    naive einsum attention ("naive_*"): for one training forward of the model of `spec` on
    `video`, and for one model-4 attention layer of ViViT-B at the paper's input (32 frames of
    224 x 224 in 2 x 16 x 16 tubelets: 16 x 196 tokens, 12 heads of 64)."""
    tokens = torch.randn(1, 16, 196, 768, device=video.device, requires_grad=True)
    report: dict[str, int | str] = {}
    for name, backend in (("fused", "auto"), ("naive", "reference")):
        torch.manual_seed(0)
        model = build_model(spec, backend=backend, drop_rate=0.0, drop_path_rate=0.0).to(video.device).train()
        report[f"{name}_model"] = saved_bytes(model, video)
        layer = FactorisedAttention(768, 12, mode="split", backend=backend).to(video.device)
        report[f"{name}_vivit_b_layer"] = saved_bytes(layer, tokens)
    q = tokens.new_empty(1, 12, 16 * 196, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report["fused_backend"] = attention_backend(q, q, q, 16, "split")
    return report
