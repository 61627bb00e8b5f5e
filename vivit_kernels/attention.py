"""Factorised attention over a (frames x space) token grid: the functional op and the module."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from . import backends
from .checks import AttentionShape, check_attention, check_heads, check_mode


def factorised_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    mode: str,
    scale: float | None = None,
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention restricted to the groups a ViViT mode defines.

    Args:
        q, k, v: (B, H, N, Dh), any strides; views of one packed (B, N, 3, H, Dh) qkv
            projection are the normal case and are read without a copy by the fused backends.
        frames: T. The N = T * S tokens are time-major: token n = t * S + s.
        mode: "joint" (all N tokens), "spatial" (the S tokens of the same frame),
            "temporal" (the T tokens at the same spatial index), or "split" (heads [0, H/2)
            spatial, heads [H/2, H) temporal; H must be even).
        scale: logit scale, Dh ** -0.5 when None (as in F.scaled_dot_product_attention).
        dropout_p: dropout on the attention probabilities (reference backend only).
        backend: "auto", "reference", or another registered backend ("triton", "cpu").

    Returns:
        (B, H, N, Dh), the dtype and device of q.

    Non-finite input never crashes: a NaN or inf in q/k/v makes NaN the output rows whose group
    contains it. The reference and cpu backends keep it to those rows; the triton backend packs
    short groups (shorter than its tile) into one tile, where a non-finite v (and, in backward, any
    non-finite input) also reaches the other groups of that tile.
    """
    selected, shape = _dispatch(q, k, v, frames, mode, scale, dropout_p, backend)
    return selected.run(q, k, v, shape)


def attention_backend(*args, **kwargs) -> str:
    """The name of the backend `factorised_attention(*args, **kwargs)` runs on; nothing is computed."""
    call = inspect.signature(factorised_attention).bind(*args, **kwargs)
    call.apply_defaults()
    return _dispatch(**call.arguments)[0].name


def _dispatch(q, k, v, frames, mode, scale, dropout_p, backend) -> tuple[backends.Selected, AttentionShape]:
    shape = check_attention(q, k, v, frames, mode, scale, dropout_p)
    return backends.select(backends.Request("attention", q.device, q.dtype, shape), backend), shape


class FactorisedAttention(nn.Module):
    """Multi-head self-attention over video tokens, factorised over space and time.

    A drop-in for timm's `Attention`: the parameters are `qkv` and `proj`, so a timm
    `Attention` state dict loads unchanged (with mode="joint" it computes the same function).

    Args:
        dim: token width D.
        num_heads: number of heads H; D must be divisible by it (and H even for "split").
        mode: "joint", "spatial", "temporal" or "split" (see `factorised_attention`).
        qkv_bias: learn a bias for the qkv projection.
        attn_drop: dropout on the attention probabilities (the fused kernels do not implement
            it: with attn_drop > 0 training runs the reference path).
        proj_drop: dropout after the output projection.
        scale: logit scale, head_dim ** -0.5 when None.
        frames: T for (B, N, D) inputs when `forward` is not told it, so the module can stand
            where a timm `Attention` stood and be called as `attn(x)`.
        backend: backend for the attention op ("auto" picks the fastest that fits).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mode: str = "split",
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        scale: float | None = None,
        frames: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"FactorisedAttention: dim={dim} is not divisible by num_heads={num_heads}")
        check_mode("FactorisedAttention", mode)
        check_heads("FactorisedAttention", mode, num_heads, "num_heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.mode = mode
        self.scale = scale
        self.frames = frames
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        frames: int | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, S, D), or (B, N, D) with `frames` = T given here or at construction.

        Returns x's shape. `attn_mask` and `is_causal` exist for timm's `Block`, which passes
        them; the mode is the mask, so only their defaults are accepted.
        """
        if attn_mask is not None or is_causal:
            raise ValueError(
                "FactorisedAttention: attn_mask / is_causal are not supported; the mode "
                f"({self.mode!r}) defines which tokens attend to which"
            )
        if x.dim() == 4:
            B, T, S, D = x.shape
            if frames is not None and frames != T:
                raise ValueError(f"FactorisedAttention: x has T={T} frames but frames={frames} was given")
            frames, N = T, T * S
        elif x.dim() == 3:
            B, N, D = x.shape
            frames = self.frames if frames is None else frames
            if frames is None:
                raise ValueError("FactorisedAttention: a (B, N, D) input needs frames=T (or pass x as (B, T, S, D))")
        else:
            raise ValueError(f"FactorisedAttention: x must be (B, T, S, D) or (B, N, D), got shape {tuple(x.shape)}")
        if D != self.qkv.in_features:
            raise ValueError(f"FactorisedAttention: x has dim {D}, expected {self.qkv.in_features}")

        # (B, N, 3, H, Dh) -> three (B, H, N, Dh) views of the packed projection: no copy.
        qkv = self.qkv(x.reshape(B, N, D)).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = factorised_attention(
            q,
            k,
            v,
            frames,
            self.mode,
            self.scale,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )
        # Fused backends return a (B, H, N, Dh) view of a (B, N, H, Dh) buffer: this reshape is free.
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        return self.proj_drop(out).reshape(x.shape)

    def extra_repr(self) -> str:
        frames = "" if self.frames is None else f", frames={self.frames}"
        return f"mode={self.mode!r}, num_heads={self.num_heads}, head_dim={self.head_dim}{frames}, backend={self.backend!r}"
