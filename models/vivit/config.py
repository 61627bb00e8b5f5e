"""ViViT configuration: one dataclass, and the presets of the paper as a small table."""

from __future__ import annotations

from dataclasses import dataclass, fields

from vivit_kernels.checks import check_choice

VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")
TOKENISERS = ("tubelet", "uniform")
POOLINGS = ("cls", "avg")
ACTIVATIONS = ("gelu", "gelu_tanh")
ATTENTION_ORDERS = ("space_time", "time_space")
MEMORY_MODES = ("default", "lean")
# What one block keeps for backward, most to least (D-wide tensors per token, model 3 in brackets):
# default 16 (22); lean 10 (15): LayerNorms and GELU recomputed; recompute_mlp 6 (11): lean, and the
# MLP keeps only its input y (fc1 recomputed in backward); checkpoint 1 (1): the block input only.
BLOCK_MEMORY = ("default", "lean", "recompute_mlp", "checkpoint")


@dataclass
class ViViTConfig:
    """Every choice that shapes a ViViT model.

    Args:
        variant: "spatio_temporal" (model 1), "factorised_encoder" (model 2),
            "factorised_self_attention" (model 3) or "factorised_dot_product" (model 4).
        num_classes: classifier outputs; 0 replaces the head with an identity (features out).
        img_size: input (H, W), or one int for both.
        num_frames: input frames T for the tubelet tokeniser; frames sampled from the clip
            (n_t) for the uniform tokeniser.
        tubelet: (t, h, w) tubelet; the uniform tokeniser uses (1, h, w).
        tokeniser: "tubelet" or "uniform" (uniform frame sampling, then 2D patches).
        in_chans: input channels C.
        dim, depth, num_heads, mlp_ratio: the transformer's width, blocks (L, or L_s for
            model 2), heads and MLP expansion.
        temporal_depth: L_t, blocks of model 2's temporal encoder.
        pooling: "cls" (a CLS token) or "avg" (global average pooling). None picks the
            official choice: "cls" for models 1 and 2; models 3 and 4 have no CLS token, "avg".
        drop_rate: dropout after the embedding, in the MLP and attention outputs, and before the head.
        attn_drop_rate: dropout on attention probabilities (runs the reference attention when > 0).
        drop_path_rate: stochastic depth at the last block, rising linearly from 0 at the first.
        grad_checkpointing: recompute each block in backward (torch.utils.checkpoint).
        memory: "default", or "lean": each block recomputes its LayerNorms and GELU in backward
            instead of keeping their outputs (10 D-wide activation tensors per token per block
            kept, not 16; the same function and gradients); or any policy of BLOCK_MEMORY for
            every block: "recompute_mlp" (6: lean, and fc1 recomputed from the MLP's input) or
            "checkpoint" (1: the block recomputed whole in backward, lean inside).
        block_memory: one BLOCK_MEMORY policy per block (model 2: the spatial encoder's blocks,
            then the temporal encoder's), in place of `memory` for every block; None: `memory`.
        mlp_activation: "gelu" (exact, as timm) or "gelu_tanh" (tanh approximation, as HF ViViT and scenic).
        attention_order: model 3's order in a block: "space_time" (the paper) or "time_space".
        backend: backend of every vivit_kernels op ("auto", "reference", ...).
        qkv_bias: learn a bias in the qkv projections.
        norm_eps: LayerNorm epsilon (1e-6, as the reference implementations).
    """

    variant: str = "spatio_temporal"
    num_classes: int = 400
    img_size: int | tuple[int, int] = 224
    num_frames: int = 32
    tubelet: tuple[int, int, int] = (2, 16, 16)
    tokeniser: str = "tubelet"
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    temporal_depth: int = 4
    pooling: str | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    memory: str = "default"
    block_memory: tuple[str, ...] | None = None
    mlp_activation: str = "gelu"
    attention_order: str = "space_time"
    backend: str = "auto"
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size, "img_size")
        self.tubelet = _triple(self.tubelet, "tubelet")
        if self.tokeniser == "uniform":
            self.tubelet = (1, *self.tubelet[1:])
        if self.pooling is None:
            self.pooling = "cls" if self.variant in ("spatio_temporal", "factorised_encoder") else "avg"
        for name, value, allowed in (
            ("variant", self.variant, VARIANTS),
            ("tokeniser", self.tokeniser, TOKENISERS),
            ("pooling", self.pooling, POOLINGS),
            ("mlp_activation", self.mlp_activation, ACTIVATIONS),
            ("attention_order", self.attention_order, ATTENTION_ORDERS),
            ("memory", self.memory, BLOCK_MEMORY),
        ):
            check_choice("ViViTConfig", name, value, allowed)
        for name in ("num_frames", "in_chans", "dim", "depth", "num_heads", "temporal_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViViTConfig: {name} must be a positive int, got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"ViViTConfig: num_classes must be an int >= 0, got {self.num_classes!r}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)) or not self.mlp_ratio > 0:
            raise ValueError(f"ViViTConfig: mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"ViViTConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.variant == "factorised_dot_product" and self.num_heads % 2:
            raise ValueError(
                f"ViViTConfig: factorised_dot_product splits the heads in half (spatial, temporal); "
                f"num_heads must be even, got {self.num_heads}"
            )
        if self.pooling == "cls" and self.variant in ("factorised_self_attention", "factorised_dot_product"):
            raise ValueError(
                f"ViViTConfig: {self.variant} has no CLS token (its tokens keep the (n_t, n_h, n_w) grid); "
                "use pooling='avg'"
            )
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"ViViTConfig: {name} must be in [0, 1), got {value!r}")
        if self.block_memory is not None:
            self.block_memory = _block_memory(self.block_memory, self.num_blocks)
        t, h, w = self.tubelet
        if self.tokeniser == "tubelet" and self.num_frames < t:
            raise ValueError(
                f"ViViTConfig: num_frames={self.num_frames} is shorter than the tubelet length t={t} of tubelet={self.tubelet}"
            )
        if self.img_size[0] < h or self.img_size[1] < w:
            raise ValueError(
                f"ViViTConfig: img_size={self.img_size} is smaller than the patch ({h}, {w}) of tubelet={self.tubelet}"
            )

    @property
    def has_cls_token(self) -> bool:
        return self.pooling == "cls"

    @property
    def num_blocks(self) -> int:
        """Transformer blocks of the model: depth, and model 2's temporal_depth besides."""
        return self.depth + (self.temporal_depth if self.variant == "factorised_encoder" else 0)

    @property
    def block_policies(self) -> tuple[str, ...]:
        """The BLOCK_MEMORY policy of every block, in the order of `block_memory` (grad_checkpointing
        checkpoints every block besides)."""
        return self.block_memory if self.block_memory is not None else (self.memory,) * self.num_blocks

    @property
    def grid(self) -> tuple[int, int, int]:
        """(n_t, n_h, n_w): the token grid of the input."""
        t, h, w = self.tubelet
        nt = self.num_frames if self.tokeniser == "uniform" else self.num_frames // t
        return nt, self.img_size[0] // h, self.img_size[1] // w


# Fields that say how a model runs, not what it computes: two configs that differ only here
# hold the same weights and give the same logits (up to rounding).
EXECUTION_FIELDS = ("backend", "grad_checkpointing", "memory", "block_memory")
# Regularisation used only in training: the weights and the eval-mode function do not depend on it.
TRAINING_ONLY_FIELDS = ("drop_rate", "attn_drop_rate", "drop_path_rate")


def config_differences(
    a: ViViTConfig, b: ViViTConfig, ignore: tuple[str, ...] = EXECUTION_FIELDS
) -> list[tuple[str, object, object]]:
    """[(field, value in a, value in b)] of every ViViTConfig field on which `a` and `b` differ,
    in declaration order, leaving out `ignore`."""
    return [
        (f.name, getattr(a, f.name), getattr(b, f.name))
        for f in fields(ViViTConfig)
        if f.name not in ignore and getattr(a, f.name) != getattr(b, f.name)
    ]


def format_differences(differences: list[tuple[str, object, object]], names: dict[str, str] | None = None) -> str:
    """ "dim 64 vs 32, variant 'a' vs 'b'" from `config_differences`; `names` renames fields (e.g. to options)."""
    names = names or {}
    return ", ".join(f"{names.get(field, field)} {_show(a)} vs {_show(b)}" for field, a, b in differences)


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in pair):
        raise ValueError(f"ViViTConfig: {name} must be a positive int or an (H, W) pair, got {value!r}")
    return pair


def _block_memory(value, blocks: int) -> tuple[str, ...]:
    policies = (value,) * blocks if isinstance(value, str) else tuple(value)
    if len(policies) != blocks or any(p not in BLOCK_MEMORY for p in policies):
        raise ValueError(
            f"ViViTConfig: block_memory must be {blocks} policies (one per block), each one of "
            f"{', '.join(map(repr, BLOCK_MEMORY))}, got {value!r}"
        )
    return policies


def _triple(value, name: str) -> tuple[int, int, int]:
    triple = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(triple) != 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in triple):
        raise ValueError(f"ViViTConfig: {name} must be a positive int or a (t, h, w) triple, got {value!r}")
    return triple


# The backbones of the paper (ViT-B/16, ViT-L/16, ViT-H/14), at its default ViViT-B/16x2 input:
# 32 frames of 224 x 224, 2-frame tubelets, a Kinetics-400 head.
PRESETS: dict[str, dict] = {
    "vivit_b": dict(dim=768, depth=12, num_heads=12, mlp_ratio=4.0, tubelet=(2, 16, 16)),
    "vivit_l": dict(dim=1024, depth=24, num_heads=16, mlp_ratio=4.0, tubelet=(2, 16, 16)),
    "vivit_h": dict(dim=1280, depth=32, num_heads=16, mlp_ratio=4.0, tubelet=(2, 14, 14)),
}


def preset_config(name: str, variant: str = "spatio_temporal", **overrides) -> ViViTConfig:
    """The ViViTConfig of a preset, with `overrides` (any ViViTConfig field) applied."""
    check_choice("preset_config", "name", name, tuple(PRESETS))
    known = {f.name for f in fields(ViViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown ViViTConfig field(s) {', '.join(map(repr, unknown))}")
    return ViViTConfig(**{**PRESETS[name], "variant": variant, **overrides})
