"""The training loss: cross-entropy with label smoothing, or against mixup's soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def classification_loss(
    model: torch.nn.Module,
    video: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    mixup_alpha: float,
    smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of `model` on `video` (B, C, T, H, W) with `labels` (B,); mixed first when
    `mixup_alpha` > 0. The loss is computed in float32 whatever the logits' dtype."""
    if mixup_alpha > 0:
        video, soft = mixup(video, labels, num_classes, mixup_alpha, smoothing)
        logits = model(video)
        return torch.sum(-soft * F.log_softmax(logits.float(), -1), -1).mean(), logits
    logits = model(video)
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing), logits
