"""The training family: a full ViViT-B training step (forward, backward, AdamW) per variant, the
einsum attention ("reference") against whatever "auto" fuses."""

from __future__ import annotations

import torch

from vivit import create_model

from .core import BASELINE, Case, parse_target, train_step_case

# A full ViViT-B training step (86M parameters). The CPU run uses a short, small clip
# (4 x 7 x 7 = 196 tokens) so that eight models (four variants, fused and naive) train within
# the CPU budget; GPUs take 16 frames at the paper's 224 x 224 (8 x 14 x 14 = 1568 tokens).
TRAINING_SHAPES = {
    "vivit_b": {
        "cpu": dict(B=1, num_frames=8, img_size=112),
        "cuda": dict(B=8, num_frames=16, img_size=224),
    },
}
# The smoke run shrinks the model too (overrides are ViViTConfig fields); heads stay 64 wide.
TRAINING_SMOKE = dict(B=1, num_frames=4, img_size=32, overrides=dict(dim=128, depth=2, num_heads=2, temporal_depth=1))
TRAINING_TARGETS = ("cpu-float32", "cuda-bfloat16")  # GPUs train under bf16 autocast
TRAINING_BACKENDS = (BASELINE, "auto")  # naive einsum attention against whatever "auto" fuses


def training_model(spec: dict) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The case's model on the target device (seeded: the same weights for every backend), a
    batch of clips (B, 3, T, size, size) and its labels (B,)."""
    device, _ = parse_target(spec["target"])
    shape = spec["shape"]
    B, T, size = shape["B"], shape["num_frames"], shape["img_size"]
    torch.manual_seed(0)
    model = create_model(
        "vivit_b",
        variant=spec["variant"],
        num_classes=400,
        num_frames=T,
        img_size=size,
        backend=spec["backend"],
        grad_checkpointing=False,
        **shape.get("overrides", {}),
    ).to(device)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, 3, T, size, size, generator=g).to(device)
    labels = torch.randint(0, 400, (B,), generator=g).to(device)
    return model, video, labels


def training_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    model, video, labels = training_model(spec)
    return train_step_case(model, lambda: model(video), labels, device, dtype)
