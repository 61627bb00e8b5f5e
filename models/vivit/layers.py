"""Transformer blocks of the ViViT variants, on vivit_kernels' FactorisedAttention.

Parameter names follow timm's VisionTransformer (norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
mlp.fc2), so image-model weights map onto them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vivit_kernels import FactorisedAttention, gelu_linear, norm_linear
from vivit_kernels.checks import check_choice
from vivit_kernels.lean import plain_linear

from .config import ACTIVATIONS, ATTENTION_ORDERS, BLOCK_MEMORY


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
            vivit_kernels.lean); "recompute_mlp": lean, and the MLP keeps only its input (6);
            "checkpoint": as lean (the model recomputes the whole block in backward).
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

    def __post_init__(self) -> None:
        check_choice("BlockConfig", "memory", self.memory, BLOCK_MEMORY)

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

    def forward_recompute(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """self(norm(x)), keeping for backward only x: norm(x), fc1's output and GELU's are
        recomputed there (one extra D x hidden product per token). With dropout after the GELU,
        as `forward_lean` (the mask must be kept)."""
        if self.drop1.p > 0 and self.training:
            return self.forward_lean(x, norm)
        fc1, fc2 = self.fc1, self.fc2
        out = _RecomputedMlp.apply(
            x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.act.approximate
        )
        return self.drop2(out)


def _norm_fc1_gelu(x, norm_weight, norm_bias, eps, w1, b1, approximate):
    return F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), w1, b1), approximate=approximate)


class _RecomputedMlp(torch.autograd.Function):
    """fc2(GELU(fc1(LN(x)))) keeping x (and the weights) for backward. Backward reruns LN, fc1 and
    GELU under the forward's autocast state, so they compute what the forward computed."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, eps, w1, b1, w2, b2, approximate):
        device = x.device.type
        ctx.autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        ctx.eps, ctx.approximate, ctx.bias_dtype = eps, approximate, None if b2 is None else b2.dtype
        activated = _norm_fc1_gelu(x, norm_weight, norm_bias, eps, w1, b1, approximate)
        ctx.save_for_backward(x, norm_weight, norm_bias, w1, b1, w2)
        return F.linear(activated, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, norm_weight, norm_bias, w1, b1, w2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        enabled, dtype = ctx.autocast
        inputs = [(x, needs[0]), (norm_weight, needs[1]), (norm_bias, needs[2]), (w1, needs[4]), (b1, needs[5])]
        leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in inputs]
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            activated = _norm_fc1_gelu(*leaves[:3], ctx.eps, *leaves[3:], ctx.approximate)
        # fc2's backward as autocast's linear computes it: in grad's dtype, parameters' grads cast back.
        flat_grad = grad.reshape(-1, grad.shape[-1])
        d_w2 = (flat_grad.t() @ activated.detach().reshape(-1, activated.shape[-1])).to(w2.dtype) if needs[6] else None
        d_b2 = flat_grad.sum(0).to(ctx.bias_dtype) if needs[7] and ctx.bias_dtype is not None else None
        d_activated = grad @ w2.to(grad.dtype)
        wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        found = iter(torch.autograd.grad(activated, wanted, d_activated) if wanted else ())
        d_x, d_nw, d_nb, d_w1, d_b1 = (
            next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves
        )
        return d_x, d_nw, d_nb, None, d_w1, d_b1, d_w2, d_b2, None


def mlp_branch(norm: nn.LayerNorm, mlp: Mlp, x: torch.Tensor, memory: str) -> torch.Tensor:
    """mlp(norm(x)) as the block's memory policy keeps it for backward. Projections an adapter
    wraps (not plain Linears) are called as they are, keeping what the default keeps."""
    if memory == "default" or not (plain_linear(mlp.fc1) and plain_linear(mlp.fc2)):
        return mlp(norm(x))
    return mlp.forward_recompute(x, norm) if memory == "recompute_mlp" else mlp.forward_lean(x, norm)


def attention_branch(norm: nn.LayerNorm, attn: FactorisedAttention, x: torch.Tensor, frames: int, lean: bool):
    """attn(norm(x)); lean: keeping x for backward, not norm(x) (recomputed)."""
    if lean:
        return attn.attend(attn.project_qkv(x, norm), frames)
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
        self.memory = config.memory
        self.norm1 = config.norm()
        self.attn = config.attention(mode)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = config.norm()
        self.mlp = config.mlp()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        """x: (B, N, D) with N = frames * S time-major tokens -> (B, N, D)."""
        x = x + self.drop_path1(attention_branch(self.norm1, self.attn, x, frames, self.lean))
        return x + self.drop_path2(mlp_branch(self.norm2, self.mlp, x, self.memory))

    @property
    def lean(self) -> bool:
        """LayerNorms and GELU recomputed in backward (every policy but "default")."""
        return self.memory != "default"


class FactorisedSelfAttentionBlock(nn.Module):
    """Model 3's block (ViViT eqs. 4-6): spatial MSA, temporal MSA, MLP, each pre-normed and residual.

    The spatial half keeps timm's names (norm1, attn); the temporal MSA is `temporal_norm`,
    `temporal_attn`. Arguments as `Block`, plus `order`: "space_time" (the paper) or "time_space".
    """

    def __init__(self, config: BlockConfig, *, order: str = "space_time", drop_path: float = 0.0) -> None:
        super().__init__()
        check_choice("FactorisedSelfAttentionBlock", "order", order, ATTENTION_ORDERS)
        self.order = order
        self.memory = config.memory
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
        return x + self.drop_path(mlp_branch(self.norm2, self.mlp, x, self.memory))

    @property
    def lean(self) -> bool:
        """LayerNorms and GELU recomputed in backward (every policy but "default")."""
        return self.memory != "default"

    def extra_repr(self) -> str:
        return f"order={self.order!r}"
