"""Transformer blocks of the ViViT variants, on vivit_kernels' FactorisedAttention.

Parameter names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2), so image-model weights map onto them by name.
"""

from __future__ import annotations

import torch
from torch import nn
from vivit_kernels import FactorisedAttention


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample, rescaling the kept ones by 1 / keep."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout.

    Args:
        dim: token width D.
        hidden: hidden width.
        activation: "gelu" (exact) or "gelu_tanh" (tanh approximation).
        drop: dropout after the activation and after fc2.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: y = x + MSA(LN(x)); z = y + MLP(LN(y)).

    Args:
        dim, num_heads, mlp_ratio: width, heads, MLP expansion.
        mode: the attention's token groups ("joint", "spatial", "temporal", "split").
        activation: the MLP's GELU ("gelu" or "gelu_tanh").
        drop: dropout on the attention and MLP outputs.
        attn_drop: dropout on attention probabilities.
        drop_path: stochastic-depth probability of both residual branches.
        qkv_bias: learn a qkv bias.
        norm_eps: LayerNorm epsilon.
        backend: vivit_kernels backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mode: str = "joint",
        activation: str = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = FactorisedAttention(
            dim, num_heads, mode=mode, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, backend=backend
        )
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation, drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """x: (B, N, D) with N = frames * S time-major tokens -> (B, N, D)."""
        x = x + self.drop_path1(self.attn(self.norm1(x), frames=frames))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class FactorisedSelfAttentionBlock(nn.Module):
    """Model 3's block (ViViT eqs. 4-6): spatial MSA, temporal MSA, MLP, each pre-normed and residual.

    The spatial half keeps timm's names (norm1, attn); the temporal MSA is `temporal_norm`,
    `temporal_attn`. Arguments as `Block`, plus `order`: "space_time" (the paper) or "time_space".
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        order: str = "space_time",
        activation: str = "gelu",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.order = order

        def attention(mode: str) -> FactorisedAttention:
            return FactorisedAttention(
                dim, num_heads, mode=mode, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, backend=backend
            )

        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attention("spatial")
        self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = attention("temporal")
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation, drop)
        self.drop_path = DropPath(drop_path)

    def _spatial(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return x + self.drop_path(self.attn(self.norm1(x), frames=frames))

    def _temporal(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return x + self.drop_path(self.temporal_attn(self.temporal_norm(x), frames=frames))

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """x: (B, N, D) with N = frames * S time-major tokens -> (B, N, D)."""
        if self.order == "space_time":
            x = self._temporal(self._spatial(x, frames), frames)
        else:
            x = self._spatial(self._temporal(x, frames), frames)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
