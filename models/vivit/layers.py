"""Transformer blocks of the ViViT variants, on vivit_kernels' FactorisedAttention.

Parameter names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2), so image-model weights map onto them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vivit_kernels import FactorisedAttention, gelu_linear, norm_linear
from vivit_kernels.checks import check_choice

from .config import ACTIVATIONS, ATTENTION_ORDERS


@dataclass(frozen=True)
class BlockConfig:
    """What every transformer block of a model shares.

    Args:
        dim, num_heads, mlp_ratio: width, heads, MLP expansion.
        activation: the MLP's GELU ("gelu" or "gelu_tanh").
        drop: dropout on the attention and MLP outputs.
        attn_drop: dropout on attention probabilities.
        qkv_bias: learn a qkv bias.
        norm_eps: LayerNorm epsilon.
        backend: vivit_kernels backend.
        memory: "default", or "lean": recompute the LayerNorms and the GELU in backward instead of
            keeping their outputs (10 D-wide tensors per token kept per block, not 16; see
            vivit_kernels.lean).
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    drop: float = 0.0
    attn_drop: float = 0.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    backend: str = "auto"
    memory: str = "default"

    @property
    def lean(self) -> bool:
        return self.memory == "lean"

    def attention(self, mode: str) -> FactorisedAttention:
        return FactorisedAttention(
            self.dim,
            self.num_heads,
            mode=mode,
            qkv_bias=self.qkv_bias,
            attn_drop=self.attn_drop,
            proj_drop=self.drop,
            backend=self.backend,
        )

    def norm(self) -> nn.LayerNorm:
        return nn.LayerNorm(self.dim, eps=self.norm_eps)

    def mlp(self) -> Mlp:
        return Mlp(self.dim, int(self.dim * self.mlp_ratio), self.activation, self.drop)


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
        check_choice("Mlp", "activation", activation, ACTIVATIONS)
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def forward_lean(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """self(norm(x)), keeping for backward x and the hidden activation, not norm(x) or GELU's
        output (recomputed). With dropout after the GELU its output is kept: the mask must be."""
        hidden = norm_linear(x, norm, self.fc1.weight, self.fc1.bias)
        if self.drop1.p > 0 and self.training:
            return self.drop2(self.fc2(self.drop1(self.act(hidden))))
        return self.drop2(gelu_linear(hidden, self.fc2.weight, self.fc2.bias, self.act.approximate))


def attention_branch(norm: nn.LayerNorm, attn: FactorisedAttention, x: torch.Tensor, frames: int, lean: bool):
    """attn(norm(x)); lean: keeping x for backward, not norm(x) (recomputed)."""
    if lean:
        return attn.attend(norm_linear(x, norm, attn.qkv.weight, attn.qkv_bias), frames)
    return attn(norm(x), frames=frames)


class Block(nn.Module):
    """Pre-norm transformer block: y = x + MSA(LN(x)); z = y + MLP(LN(y)).

    Args:
        config: the block's width, heads, dropouts, ... (a BlockConfig).
        mode: the attention's token groups ("joint", "spatial", "temporal", "split").
        drop_path: stochastic-depth probability of both residual branches.
    """

    def __init__(self, config: BlockConfig, *, mode: str = "joint", drop_path: float = 0.0) -> None:
        super().__init__()
        self.lean = config.lean
        self.norm1 = config.norm()
        self.attn = config.attention(mode)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = config.norm()
        self.mlp = config.mlp()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """x: (B, N, D) with N = frames * S time-major tokens -> (B, N, D)."""
        x = x + self.drop_path1(attention_branch(self.norm1, self.attn, x, frames, self.lean))
        return x + self.drop_path2(self.mlp.forward_lean(x, self.norm2) if self.lean else self.mlp(self.norm2(x)))


class FactorisedSelfAttentionBlock(nn.Module):
    """Model 3's block (ViViT eqs. 4-6): spatial MSA, temporal MSA, MLP, each pre-normed and residual.

    The spatial half keeps timm's names (norm1, attn); the temporal MSA is `temporal_norm`,
    `temporal_attn`. Arguments as `Block`, plus `order`: "space_time" (the paper) or "time_space".
    """

    def __init__(self, config: BlockConfig, *, order: str = "space_time", drop_path: float = 0.0) -> None:
        super().__init__()
        check_choice("FactorisedSelfAttentionBlock", "order", order, ATTENTION_ORDERS)
        self.order = order
        self.lean = config.lean
        self.norm1 = config.norm()
        self.attn = config.attention("spatial")
        self.temporal_norm = config.norm()
        self.temporal_attn = config.attention("temporal")
        self.norm2 = config.norm()
        self.mlp = config.mlp()
        self.drop_path = DropPath(drop_path)

    def _spatial(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return x + self.drop_path(attention_branch(self.norm1, self.attn, x, frames, self.lean))

    def _temporal(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        return x + self.drop_path(attention_branch(self.temporal_norm, self.temporal_attn, x, frames, self.lean))

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """x: (B, N, D) with N = frames * S time-major tokens -> (B, N, D)."""
        if self.order == "space_time":
            x = self._temporal(self._spatial(x, frames), frames)
        else:
            x = self._spatial(self._temporal(x, frames), frames)
        return x + self.drop_path(self.mlp.forward_lean(x, self.norm2) if self.lean else self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
