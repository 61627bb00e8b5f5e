"""The "cpu" backend: the C++ kernels of csrc/, as PyTorch custom ops.

The library declares the ops `vivit_kernels::cpu_*` and their CPU kernels; this module adds what
PyTorch needs around them: fake kernels (shapes and strides for meta tensors and torch.compile),
autograd, and FLOP formulas. The library is loaded, or built, on first use; when it cannot be,
the backend says why and "auto" falls back to the reference backend with a warning.
"""

from __future__ import annotations

import torch

from .. import _extension
from .registry import Backend, OpSupport, register

_DTYPES = (torch.float32, torch.float64)
# Any head dim runs; per-thread scratch grows as 256 x Dh, hence a bound.
_HEAD_DIMS = (1, 1024)
_registered = False


def _unavailable() -> str | None:
    try:
        _ensure_loaded()
    except RuntimeError as error:
        return str(error)
    return None


def _ensure_loaded() -> None:
    global _registered
    _extension.load()
    if not _registered:
        _register_python_side()
        _registered = True


def _group_length_sum(mode: str, frames: int, tokens: int, heads: int) -> int:
    """Sum over heads of the group length L each token attends to (FLOPs are 4 * B * N * Dh * this)."""
    spatial = tokens // frames
    if mode == "split":
        return heads // 2 * spatial + (heads - heads // 2) * frames
    return heads * {"joint": tokens, "spatial": spatial, "temporal": frames}[mode]


def _tubelet_flops(video_shape, weight_shape) -> int:
    B, C, T, H, W = video_shape
    D, _, t, h, w = weight_shape
    return 2 * B * (T // t) * (H // h) * (W // w) * D * C * t * h * w


def _register_python_side() -> None:
    from torch.utils.flop_counter import register_flop_formula

    ops = torch.ops.vivit_kernels

    # Attention: out is a (B, H, N, Dh) view of a (B, N, H, Dh) buffer, lse is (B, H, N).
    @torch.library.register_fake("vivit_kernels::cpu_attention_forward")
    def _(q, k, v, frames, mode, scale):
        B, H, N, Dh = q.shape
        return q.new_empty(B, N, H, Dh).transpose(1, 2), q.new_empty(B, H, N)

    @torch.library.register_fake("vivit_kernels::cpu_attention_backward")
    def _(grad_out, q, k, v, out, lse, frames, mode, scale):
        B, H, N, Dh = q.shape
        return tuple(q.new_empty(B, H, N, Dh) for _ in range(3))

    def setup_attention(ctx, inputs, output):
        q, k, v, frames, mode, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.frames, ctx.mode, ctx.scale = frames, mode, scale

    def attention_backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.cpu_attention_backward(grad_out, q, k, v, out, lse, ctx.frames, ctx.mode, ctx.scale)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(
        "vivit_kernels::cpu_attention_forward", attention_backward, setup_context=setup_attention
    )

    @register_flop_formula(ops.cpu_attention_forward)
    def _(q_shape, k_shape, v_shape, frames, mode, scale, *args, out_shape=None, **kwargs) -> int:
        B, H, N, Dh = q_shape
        return 4 * B * N * Dh * _group_length_sum(mode, frames, N, H)

    @register_flop_formula(ops.cpu_attention_backward)
    def _(grad_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, frames, mode, scale, *args, **kwargs) -> int:
        B, H, N, Dh = q_shape
        return 10 * B * N * Dh * _group_length_sum(mode, frames, N, H)  # 2.5x the forward

    # Tubelet embedding: tokens (B, nt, S', D); pos_embed arrives as (nt * S', D).
    @torch.library.register_fake("vivit_kernels::cpu_tubelet_forward")
    def _(video, weight, bias, pos_embed):
        B, _, T, H, W = video.shape
        D, _, t, h, w = weight.shape
        return video.new_empty(B, T // t, (H // h) * (W // w), D)

    @torch.library.register_fake("vivit_kernels::cpu_tubelet_video_grad")
    def _(grad, weight, video_size):
        return grad.new_empty(video_size)

    @torch.library.register_fake("vivit_kernels::cpu_tubelet_weight_grad")
    def _(grad, video, tubelet):
        return grad.new_empty(grad.shape[-1], video.shape[1], *tubelet)

    def setup_tubelet(ctx, inputs, output):
        video, weight, bias, pos_embed = inputs
        ctx.save_for_backward(video, weight)
        ctx.has_bias, ctx.has_pos = bias is not None, pos_embed is not None

    def tubelet_backward(ctx, grad):
        video, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dvideo = ops.cpu_tubelet_video_grad(grad, weight, list(video.shape)) if needs[0] else None
        dweight = ops.cpu_tubelet_weight_grad(grad, video, list(weight.shape[2:])) if needs[1] else None
        dbias = grad.sum((0, 1, 2)) if ctx.has_bias and needs[2] else None
        dpos = grad.sum(0).flatten(0, 1) if ctx.has_pos and needs[3] else None
        return dvideo, dweight, dbias, dpos

    torch.library.register_autograd("vivit_kernels::cpu_tubelet_forward", tubelet_backward, setup_context=setup_tubelet)

    @register_flop_formula(ops.cpu_tubelet_forward)
    def _(video_shape, weight_shape, *args, **kwargs) -> int:
        return _tubelet_flops(video_shape, weight_shape)

    @register_flop_formula(ops.cpu_tubelet_video_grad)
    def _(grad_shape, weight_shape, video_size, *args, **kwargs) -> int:
        return _tubelet_flops(video_size, weight_shape)

    @register_flop_formula(ops.cpu_tubelet_weight_grad)
    def _(grad_shape, video_shape, tubelet, *args, **kwargs) -> int:
        return _tubelet_flops(video_shape, (grad_shape[-1], video_shape[1], *tubelet))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, mode: str, scale: float | None = None
) -> torch.Tensor:
    """Factorised attention by the C++ kernels (differentiable). q, k, v: (B, H, N, Dh), any strides.

    Returns (B, H, N, Dh), a view of a (B, N, H, Dh) buffer. Inputs are assumed validated.
    """
    _ensure_loaded()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.vivit_kernels.cpu_attention_forward(q, k, v, frames, mode, scale)
    return out


def tubelet_embedding(
    video: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None
) -> torch.Tensor:
    """Tubelet embedding by the C++ kernels (differentiable): (B, C, T, H, W) -> (B, nt, S', D)."""
    _ensure_loaded()
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(-1, weight.shape[0])
    return torch.ops.vivit_kernels.cpu_tubelet_forward(video, weight, bias, pos_embed)


register(
    Backend(
        name="cpu",
        ops={
            "attention": OpSupport(attention, ("cpu",), _DTYPES, head_dims=_HEAD_DIMS),
            "tubelet": OpSupport(tubelet_embedding, ("cpu",), _DTYPES),
        },
        unavailable=_unavailable,
    )
)
