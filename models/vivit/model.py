"""ViViT (Arnab et al., 2021): the four variants as one model with a `variant` switch.

    video (B, C, T, H, W) -> patch_embed -> tokens (B, n_t, S, D) -> + pos_embed
      1 spatio_temporal            [CLS] + n_t*S tokens, joint attention over all of them
      2 factorised_encoder         spatial encoder per frame (its own CLS), then a temporal
                                   encoder over the n_t frame vectors (another CLS)
      3 factorised_self_attention  per block: spatial MSA, temporal MSA, MLP; no CLS
      4 factorised_dot_product     per block: half the heads spatial, half temporal; no CLS
    -> norm -> forward_features; pooling (CLS or mean) -> head -> forward_head

Tokens are time-major (n = t * S + s) throughout, the layout vivit_kernels' ops take.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vivit_kernels import TubeletEmbedding, UniformFrameEmbedding
from vivit_kernels.checks import check_video

from .config import ViViTConfig, _block_memory, preset_config
from .layers import Block, BlockConfig, FactorisedSelfAttentionBlock

_BLOCK_MODE = {"spatio_temporal": "joint", "factorised_encoder": "joint", "factorised_dot_product": "split"}


class TemporalEncoder(nn.Module):
    """Model 2's temporal transformer over the n_t frame vectors, with its own CLS token and
    (1, [1 +] n_t, D) positional embedding."""

    def __init__(self, config: ViViTConfig, frames: int) -> None:
        super().__init__()
        c = config
        prefix = int(c.has_cls_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + frames, c.dim))
        self.blocks = _blocks(c, c.temporal_depth, "joint")
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)


class ViViT(nn.Module):
    """A ViViT video classifier.

    Args:
        config: a ViViTConfig; or leave it out and pass its fields as keyword arguments.

    `forward(video)`: (B, C, T, H, W) float -> logits (B, num_classes), or pooled features
    (B, D) when num_classes == 0. `forward_features` returns the final normalised tokens
    (the CLS token first when there is one); `forward_head` pools and classifies them.
    """

    def __init__(self, config: ViViTConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = ViViTConfig(**kwargs)
        elif kwargs:
            raise TypeError("ViViT: pass either a ViViTConfig or its fields as keyword arguments, not both")
        if not isinstance(config, ViViTConfig):
            raise TypeError(f"ViViT: config must be a ViViTConfig, got {type(config).__name__}")
        self.config = c = config
        self.grad_checkpointing = c.grad_checkpointing
        nt, nh, nw = c.grid
        self.grid = (nt, nh, nw)
        self.num_prefix_tokens = int(c.has_cls_token)
        spatial = c.variant == "factorised_encoder"

        if c.tokeniser == "uniform":
            self.patch_embed = UniformFrameEmbedding(c.in_chans, c.dim, c.tubelet[1:], c.num_frames, backend=c.backend)
        else:
            self.patch_embed = TubeletEmbedding(c.in_chans, c.dim, c.tubelet, backend=c.backend)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim)) if c.has_cls_token else None
        # Model 2's spatial encoder sees one frame at a time: its embedding covers one frame's grid.
        positions = nh * nw if spatial else nt * nh * nw
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + positions, c.dim))
        self.pos_drop = nn.Dropout(c.drop_rate)

        if c.variant == "factorised_self_attention":
            self.blocks = nn.ModuleList(
                FactorisedSelfAttentionBlock(block_config(c), order=c.attention_order, drop_path=rate)
                for rate in _drop_path_rates(c.drop_path_rate, c.depth)
            )
        else:
            self.blocks = _blocks(c, c.depth, _BLOCK_MODE[c.variant])
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.temporal = TemporalEncoder(c, nt) if spatial else None
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes else nn.Identity()
        if c.block_memory is not None:
            self.set_block_memory(c.block_memory)
        self.reset_parameters()

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def reset_parameters(self) -> None:
        """Random initialisation as timm's ViT: truncated-normal linears and positional
        embeddings; model 3's temporal MSA output projections zero, so each temporal MSA
        starts as the identity."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("pos_embed"):
                nn.init.trunc_normal_(param, std=0.02)
            elif name.endswith("cls_token"):
                nn.init.normal_(param, std=1e-6)
        for block in self.blocks:
            if isinstance(block, FactorisedSelfAttentionBlock):
                nn.init.zeros_(block.temporal_attn.proj.weight)
                nn.init.zeros_(block.temporal_attn.proj.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers conventionally leave out of weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith(("pos_embed", "cls_token"))}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint) to save memory."""
        self.grad_checkpointing = self.config.grad_checkpointing = bool(enable)

    def all_blocks(self) -> list[nn.Module]:
        """Every transformer block, in the order of `ViViTConfig.block_memory` (model 2: the spatial
        encoder's, then the temporal encoder's)."""
        return [*self.blocks, *(self.temporal.blocks if self.temporal is not None else ())]

    def set_block_memory(self, policies: str | tuple[str, ...] | list[str]) -> None:
        """Give each block a memory policy (config.BLOCK_MEMORY; one string: every block), e.g. a
        `vivit.plan_memory` plan's. The function and the gradients stay the same."""
        self.config.block_memory = policies = _block_memory(policies, self.config.num_blocks)
        for block, policy in zip(self.all_blocks(), policies):
            block.memory = policy

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, frames: int) -> torch.Tensor:
        for block in blocks:
            if (self.grad_checkpointing or block.memory == "checkpoint") and torch.is_grad_enabled():
                x = checkpoint(block, x, frames, use_reentrant=False)
            else:
                x = block(x, frames)
        return x

    def _with_cls(self, x: torch.Tensor, cls_token: nn.Parameter | None, pos_embed: torch.Tensor) -> torch.Tensor:
        """Prepend the CLS token (with its position) to x: (B, N, D) already holding the grid positions."""
        if cls_token is None:
            return x
        cls = (cls_token + pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def tokenise(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) -> tokens (B, n_t, S, D) with the grid's positional embedding
        (model 2: the per-frame embedding, the same for every frame)."""
        check_video("ViViT", video)
        nt, nh, nw = self.grid
        got = self.patch_embed.grid(*video.shape[2:])
        if video.shape[1] != self.config.in_chans or got != (nt, nh, nw):
            raise ValueError(
                f"ViViT: video of shape {tuple(video.shape)} gives a {got} token grid with {video.shape[1]} channels; "
                f"this model takes {self.config.in_chans} channels and a {(nt, nh, nw)} grid "
                f"(num_frames={self.config.num_frames}, img_size={self.config.img_size}, tubelet={self.config.tubelet})"
            )
        grid_pos = self.pos_embed[:, self.num_prefix_tokens :]
        if self.temporal is not None:
            return self.patch_embed(video) + grid_pos.unsqueeze(1)
        return self.patch_embed(video, grid_pos)

    def frame_features(self, video: torch.Tensor) -> torch.Tensor:
        """Model 2's spatial encoder: video -> (B, n_t, D), one pooled vector per frame
        (the CLS token, or the mean of the frame's tokens, after the spatial encoder's norm)."""
        if self.temporal is None:
            raise ValueError(f"ViViT: frame_features is model 2's (factorised_encoder), not {self.config.variant}'s")
        tokens = self.tokenise(video)
        B, nt, S, D = tokens.shape
        x = self._with_cls(tokens.reshape(B * nt, S, D), self.cls_token, self.pos_embed)
        x = self.norm(self._run(self.blocks, self.pos_drop(x), frames=1))
        x = x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)
        return x.reshape(B, nt, D)

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) -> final tokens (B, [1 +] N, D), normalised.

        N = n_t * S for models 1, 3 and 4 (time-major); N = n_t frame vectors for model 2.
        """
        if self.temporal is not None:
            temporal = self.temporal
            frames = self.frame_features(video) + temporal.pos_embed[:, self.num_prefix_tokens :]
            x = self._with_cls(frames, temporal.cls_token, temporal.pos_embed)
            return temporal.norm(self._run(temporal.blocks, self.pos_drop(x), frames=1))
        tokens = self.tokenise(video)
        B, nt, S, D = tokens.shape
        x = self._with_cls(tokens.reshape(B, nt * S, D), self.cls_token, self.pos_embed)
        # With a CLS token (model 1) attention is joint over all tokens: one "frame".
        frames = 1 if self.num_prefix_tokens else nt
        return self.norm(self._run(self.blocks, self.pos_drop(x), frames))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Final tokens (B, [1 +] N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        x = x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video (B, C, T, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(video))


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def block_config(c: ViViTConfig) -> BlockConfig:
    """The settings every block of a model of config `c` shares."""
    return BlockConfig(
        dim=c.dim,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_ratio,
        activation=c.mlp_activation,
        drop=c.drop_rate,
        attn_drop=c.attn_drop_rate,
        qkv_bias=c.qkv_bias,
        norm_eps=c.norm_eps,
        backend=c.backend,
        memory=c.memory,
    )


def _blocks(c: ViViTConfig, depth: int, mode: str) -> nn.ModuleList:
    config = block_config(c)
    return nn.ModuleList(Block(config, mode=mode, drop_path=rate) for rate in _drop_path_rates(c.drop_path_rate, depth))


def create_model(name: str = "vivit_b", variant: str = "spatio_temporal", num_classes: int = 400, **overrides) -> ViViT:
    """A ViViT from a preset ("vivit_b", "vivit_l", "vivit_h"): ViT-B/16, L/16 or H/14 sizes at
    32 frames of 224 x 224 with 2-frame tubelets; `overrides` are ViViTConfig fields."""
    return ViViT(preset_config(name, variant, num_classes=num_classes, **overrides))


def model_spec(preset: str, variant: str, num_classes: int, **overrides) -> dict:
    """What `build_model` needs to rebuild a model: plain data, stored in every checkpoint."""
    return {"preset": preset, "variant": variant, "num_classes": num_classes, "overrides": overrides}


def config_from_spec(spec: dict, **changes) -> ViViTConfig:
    """The ViViTConfig of a `model_spec`, with `changes` to its overrides (no weights are made)."""
    return preset_config(
        spec["preset"], spec["variant"], num_classes=spec["num_classes"], **{**spec["overrides"], **changes}
    )


def build_model(spec: dict, **changes) -> ViViT:
    """A model from a `model_spec` (e.g. a checkpoint's), with `changes` to its overrides."""
    return ViViT(config_from_spec(spec, **changes))
