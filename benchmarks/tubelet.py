"""The tubelet family: ViViT's tokeniser, every registry backend against nn.Conv3d, an
unfold+matmul version and the einsum baseline."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import vivit_kernels
from vivit_kernels.checks import TubeletShape

from .core import BACKWARD, Case, parse_target, registry_skip_reason, synchronised

# ViViT-B tubelet embedding: a 16-frame 224 x 224 RGB clip, 2 x 16 x 16 tubelets, D = 768.
TUBELET_SHAPES = {
    "vivit_b": {
        "cpu": dict(B=1, C=3, T=16, H=224, W=224, t=2, h=16, w=16, D=768),
        "cuda": dict(B=8, C=3, T=16, H=224, W=224, t=2, h=16, w=16, D=768),
    },
}
TUBELET_SMOKE = dict(B=1, C=3, T=4, H=32, W=32, t=2, h=16, w=16, D=64)


def conv3d_tubelet(video, weight, bias, pos_embed, tubelet):
    """nn.Conv3d's functional form with stride = kernel, as time-major tokens plus the positional embedding."""
    out = F.conv3d(video, weight, bias, stride=tubelet)  # (B, D, nt, nh, nw)
    return out.flatten(3).permute(0, 2, 3, 1) + pos_embed


def unfold_matmul_tubelet(video, weight, bias, pos_embed, tubelet):
    """Tubes cut with Tensor.unfold, gathered into one (tokens, C*t*h*w) matrix, one addmm."""
    t, h, w = tubelet
    B, D = video.shape[0], weight.shape[0]
    tubes = video.unfold(2, t, t).unfold(3, h, h).unfold(4, w, w)  # (B, C, nt, nh, nw, t, h, w)
    nt, nh, nw = tubes.shape[2:5]
    rows = tubes.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B * nt * nh * nw, -1)
    tokens = torch.addmm(bias, rows, weight.reshape(D, -1).t())
    return tokens.reshape(B, nt, nh * nw, D) + pos_embed


def tubelet_fn(backend: str) -> Callable[..., torch.Tensor]:
    """(video, weight, bias, pos_embed, tubelet) -> (B, nt, S', D)."""
    if backend == "conv3d":
        return conv3d_tubelet
    if backend == "unfold_matmul":
        return unfold_matmul_tubelet
    return lambda video, weight, bias, pos, tubelet: vivit_kernels.tubelet_embedding(
        video, weight, bias, pos, backend=backend
    )


def tubelet_shape(shape: dict) -> TubeletShape:
    video = (shape["B"], shape["C"], shape["T"], shape["H"], shape["W"])
    weight = (shape["D"], shape["C"], shape["t"], shape["h"], shape["w"])
    return TubeletShape.of(video, weight, torch.empty(video, device="meta").stride())


def tubelet_flops(shape: dict, pass_name: str) -> float:
    """The ops' formula: forward 2 * tokens * D * (C*t*h*w); backward (weight, bias and positional
    gradients) 1x forward."""
    return tubelet_shape(shape).flops * (2.0 if pass_name == BACKWARD else 1.0)


TUBELET_IO_FORMULA = (
    "forward: the video, weight, bias and positional embedding read, the tokens written; "
    "backward 1x forward more (the video and the tokens' gradient read, the three gradients written)"
)


def tubelet_io_bytes(shape: dict, pass_name: str, element_size: int) -> int:
    """TUBELET_IO_FORMULA in bytes, each tensor moved once per pass, for elements of `element_size` bytes."""
    B, C, T, H, W, D = (shape[k] for k in ("B", "C", "T", "H", "W", "D"))
    t, h, w = shape["t"], shape["h"], shape["w"]
    tokens = (T // t) * (H // h) * (W // w)
    forward = B * C * T * H * W + D * C * t * h * w + D + tokens * D + B * tokens * D
    return forward * (2 if pass_name == BACKWARD else 1) * element_size


def tubelet_skip_reason(spec: dict) -> str | None:
    device, dtype = parse_target(spec["target"])
    backend = spec["backend"]
    if backend not in ("conv3d", "unfold_matmul"):
        return registry_skip_reason("tubelet", backend, device, dtype, tubelet_shape(spec["shape"]))
    return None


def tubelet_case(spec: dict) -> Case:
    device, dtype = parse_target(spec["target"])
    shape, pass_name = spec["shape"], spec["pass"]
    B, C, T, H, W, D = (shape[k] for k in ("B", "C", "T", "H", "W", "D"))
    tubelet = (shape["t"], shape["h"], shape["w"])
    nt, S = T // tubelet[0], (H // tubelet[1]) * (W // tubelet[2])
    fn = tubelet_fn(spec["backend"])
    g = torch.Generator().manual_seed(0)
    video = torch.randn(B, C, T, H, W, generator=g).to(device, dtype)  # data: never needs a gradient
    params = [
        (torch.randn(D, C, *tubelet, generator=g) * 0.02).to(device, dtype),
        torch.randn(D, generator=g).to(device, dtype),
        torch.randn(nt, S, D, generator=g).to(device, dtype),
    ]
    grad = torch.randn(B, nt, S, D, generator=g).to(device, dtype)
    backward = pass_name == BACKWARD
    for p in params:
        p.requires_grad_(backward)

    def run() -> None:
        if backward:
            fn(video, *params, tubelet).backward(grad)
        else:
            with torch.no_grad():
                fn(video, *params, tubelet)

    def setup() -> None:
        for p in params:
            p.grad = None

    def saved() -> int:
        leaves = [p.detach().requires_grad_() for p in params]
        return vivit_kernels.saved_bytes(fn, video, *leaves, tubelet)

    return Case(
        setup=synchronised(setup, device),
        run=synchronised(run, device),
        saved_bytes=saved,
        flops=tubelet_flops(shape, pass_name),
        flop_formula="forward 2*tokens*D*C*t*h*w; backward (weight, bias, pos_embed grads) 1x forward",
        device=device,
    )
