"""Argument checks at the API boundary, and the shape objects they return.

Every public op validates its inputs here, before any backend runs, so a bad call fails with a
message naming the argument, what it got and what was expected, never inside a kernel. A check
returns the call's shape (`AttentionShape`, `TubeletShape`): defaults resolved, the token grid
and the FLOP counts derived once. The shape travels in the dispatch request to the backend
(whose declared limits are checked against it) and on to the op.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

MODES = ("joint", "spatial", "temporal", "split")
# The order of the grid tokens after the prefix: time-major, token P + t * S + s (ViViT, timm),
# or space-major, token P + s * T + t (TimeSformer).
LAYOUTS = ("time_major", "space_major")


def default_scale(head_dim: int) -> float:
    """The logit scale when none is given: Dh ** -0.5, as F.scaled_dot_product_attention."""
    return head_dim**-0.5


@dataclass(frozen=True)
class AttentionShape:
    """One `factorised_attention` call: q, k, v (B, H, N, Dh), N = prefix + frames * tokens_per_frame.

    `scale` is resolved (never None). Tokens [0, prefix) are outside the grid; the grid follows
    in `layout` order.
    """

    batch: int
    heads: int
    tokens: int
    head_dim: int
    frames: int
    mode: str
    scale: float
    dropout_p: float = 0.0
    prefix: int = 0
    layout: str = "time_major"

    @classmethod
    def of(
        cls,
        q_shape,
        frames: int,
        mode: str,
        scale: float | None = None,
        dropout_p: float = 0.0,
        prefix: int = 0,
        layout: str = "time_major",
    ) -> AttentionShape:
        """The shape of a call whose q has `q_shape` (for FLOP formulas, given sizes only)."""
        B, H, N, Dh = q_shape
        scale = default_scale(Dh) if scale is None else float(scale)
        return cls(B, H, N, Dh, frames, mode, scale, dropout_p, prefix, layout)

    @property
    def tokens_per_frame(self) -> int:
        """S, grid tokens per frame."""
        return (self.tokens - self.prefix) // self.frames

    @property
    def spatial(self) -> int:
        """Deprecated alias of `tokens_per_frame` (S, not the "spatial" mode)."""
        warnings.warn("AttentionShape.spatial is deprecated; use tokens_per_frame", DeprecationWarning, stacklevel=2)
        return self.tokens_per_frame

    def _scores_per_head(self, mode: str) -> int:
        P, T, S, N = self.prefix, self.frames, self.tokens_per_frame, self.tokens
        if mode == "joint":
            return N * N
        if mode == "spatial":  # T groups of the prefix and a frame, each query (prefix ones too) in each
            return T * (P + S) ** 2
        return S * T * T + P * P  # temporal: S groups of T frames, and the prefix among itself

    @property
    def averaged_prefix(self) -> tuple[int, int]:
        """(heads, groups) whose prefix queries attend group by group, their outputs averaged over
        the groups: the spatial heads (the first ones) and the T frames; (0, 0) when none do."""
        if not self.prefix or self.mode not in ("spatial", "split"):
            return 0, 0
        return (self.heads if self.mode == "spatial" else self.heads // 2), self.frames

    @property
    def scores(self) -> int:
        """(query, key) pairs scored per batch element, summed over heads."""
        if self.mode == "split":
            half = self.heads // 2
            return half * self._scores_per_head("spatial") + (self.heads - half) * self._scores_per_head("temporal")
        return self.heads * self._scores_per_head(self.mode)

    @property
    def forward_flops(self) -> int:
        """4 * B * Dh * scores: two matrix products of 2 FLOPs per multiply-add."""
        return 4 * self.batch * self.head_dim * self.scores

    @property
    def backward_flops(self) -> int:
        """2.5x the forward (FlashAttention's count: five products, recomputing the scores)."""
        return 10 * self.batch * self.head_dim * self.scores


def tubelet_grid(clip: tuple[int, int, int], tubelet: tuple[int, int, int]) -> tuple[int, int, int]:
    """(nt, nh, nw) tokens of a (T, H, W) clip: like Conv3d with stride == kernel, trailing frames,
    rows and columns that do not fill a whole tubelet are dropped."""
    return tuple(size // tube for size, tube in zip(clip, tubelet))


@dataclass(frozen=True)
class TubeletShape:
    """One `tubelet_embedding` call: (B, C, T, H, W) video -> (B, nt, nh * nw, D) tokens.

    `clip_span` is the number of elements one clip of the video spans through its strides (the
    largest offset an index map inside a clip can reach, plus one).
    """

    batch: int
    channels: int
    dim: int
    tubelet: tuple[int, int, int]
    grid: tuple[int, int, int]  # (nt, nh, nw)
    clip_span: int = 0

    @classmethod
    def of(cls, video_shape, weight_shape, video_strides=None) -> TubeletShape:
        B, C, T, H, W = video_shape
        D, _, t, h, w = weight_shape
        span = 0
        if video_strides is not None:
            span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(video_shape[1:], video_strides[1:]))
        return cls(B, C, D, (t, h, w), tubelet_grid((T, H, W), (t, h, w)), span)

    @property
    def tokens(self) -> tuple[int, int]:
        """(nt, S'): frames of tokens and tokens per frame."""
        nt, nh, nw = self.grid
        return nt, nh * nw

    @property
    def tokens_per_clip(self) -> int:
        nt, nh, nw = self.grid
        return nt * nh * nw

    @property
    def tube_size(self) -> int:
        """K = C * t * h * w, the length of one flattened tube."""
        t, h, w = self.tubelet
        return self.channels * t * h * w

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, *self.tokens, self.dim)

    @property
    def flops(self) -> int:
        """2 * tokens * D * K: the forward GEMM; each of the backward's two GEMMs costs the same."""
        return 2 * self.batch * self.tokens_per_clip * self.dim * self.tube_size

    @property
    def index_spans(self) -> dict[str, int]:
        """Elements each per-clip index map of a kernel spans (what must fit its index type)."""
        return {
            "one clip of the video": self.clip_span,
            "one clip's tokens": self.tokens_per_clip * self.dim,
            "the weight": self.dim * self.tube_size,
        }


def _check_tensor(op: str, name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")


def _check_same(op: str, named: dict[str, torch.Tensor | None]) -> None:
    """All given tensors share dtype and device with the first."""
    present = [(n, t) for n, t in named.items() if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; expected one dtype")
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; expected one device"
            )


def check_int(op: str, name: str, value, minimum: int) -> None:
    """TypeError unless `value` is an int (not a bool); ValueError if it is below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def check_positive_int(op: str, name: str, value) -> None:
    check_int(op, name, value, minimum=1)


def check_choice(op: str, name: str, value, allowed: tuple) -> None:
    """ValueError naming `op`'s argument `name` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_mode(op: str, mode) -> None:
    check_choice(op, "mode", mode, MODES)


def check_heads(op: str, mode: str, heads: int, name: str = "H") -> None:
    if mode == "split" and heads % 2:
        raise ValueError(
            f"{op}: mode 'split' needs an even number of heads (half spatial, half temporal), got {name}={heads}"
        )


def check_layout(op: str, layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{op}: unknown layout {layout!r}; expected one of {', '.join(map(repr, LAYOUTS))}")


def check_prefix(op: str, prefix) -> None:
    check_int(op, "num_prefix_tokens", prefix, minimum=0)


def grid_mismatch(
    op: str, tokens: int, prefix: int, frames: int | None = None, tokens_per_frame: int | None = None
) -> str:
    """The message for N tokens that are not prefix + frames * tokens_per_frame."""
    given = ", ".join(
        f"{name}={value}"
        for name, value in (("frames", frames), ("tokens_per_frame", tokens_per_frame))
        if value is not None
    )
    hint = " (a class token? pass num_prefix_tokens)" if prefix == 0 else ""
    return (
        f"{op}: N={tokens} tokens with num_prefix_tokens={prefix} do not fit {given}; expected "
        f"N = num_prefix_tokens + frames * tokens_per_frame{hint}"
    )


def check_attention(
    q, k, v, frames, mode, scale, dropout_p: float = 0.0, num_prefix_tokens: int = 0, layout: str = "time_major"
) -> AttentionShape:
    op = "factorised_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(op, name, x, 4, "(B, H, N, Dh)")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"{op}: q, k, v must have one shape (B, H, N, Dh), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    _check_same(op, {"q": q, "k": k, "v": v})
    return _check_grid(op, q.shape, frames, mode, scale, dropout_p, num_prefix_tokens, layout)


def check_attention_packed(
    qkv,
    num_heads,
    frames,
    mode,
    scale,
    dropout_p: float = 0.0,
    num_prefix_tokens: int = 0,
    layout: str = "time_major",
) -> AttentionShape:
    op = "factorised_attention_packed"
    _check_tensor(op, "qkv", qkv, 3, "(B, N, 3 * H * Dh)")
    check_positive_int(op, "num_heads", num_heads)
    B, N, width = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(
            f"{op}: qkv has width {width}, not divisible by 3 * num_heads = {3 * num_heads}; expected (B, N, 3 * H * Dh)"
        )
    return _check_grid(
        op, (B, num_heads, N, width // (3 * num_heads)), frames, mode, scale, dropout_p, num_prefix_tokens, layout
    )


def _check_grid(op, q_shape, frames, mode, scale, dropout_p, num_prefix_tokens, layout) -> AttentionShape:
    """The checks of the token grid and the call's options, and its shape."""
    check_mode(op, mode)
    check_layout(op, layout)
    check_positive_int(op, "frames", frames)
    check_prefix(op, num_prefix_tokens)
    B, H, N, Dh = q_shape
    if N == 0 or Dh == 0 or B == 0:
        raise ValueError(f"{op}: the input has an empty dimension (B={B}, N={N}, Dh={Dh}); expected B, N, Dh >= 1")
    if N <= num_prefix_tokens or (N - num_prefix_tokens) % frames:
        raise ValueError(grid_mismatch(op, N, num_prefix_tokens, frames))
    check_heads(op, mode, H)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise TypeError(f"{op}: scale must be a finite float or None, got {scale!r}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p!r}")
    return AttentionShape.of(q_shape, frames, mode, scale, float(dropout_p), num_prefix_tokens, layout)


def check_video(op: str, video) -> None:
    """A clip batch: a floating (B, C, T, H, W) tensor."""
    _check_tensor(op, "video", video, 5, "(B, C, T, H, W)")


def check_tubelet(video, weight, bias, pos_embed) -> TubeletShape:
    op = "tubelet_embedding"
    check_video(op, video)
    _check_tensor(op, "weight", weight, 5, "(D, C, t, h, w) like nn.Conv3d")
    for name, x in (("bias", bias), ("pos_embed", pos_embed)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(x).__name__}")
    _check_same(op, {"video": video, "weight": weight, "bias": bias, "pos_embed": pos_embed})
    B, C, T, H, W = video.shape
    D, Cw, t, h, w = weight.shape
    if Cw != C:
        raise ValueError(f"{op}: weight has {Cw} input channels but video has C={C}; expected weight (D, {C}, t, h, w)")
    if min(weight.shape) < 1 or B < 1 or C < 1:
        raise ValueError(f"{op}: empty dimension in video {tuple(video.shape)} or weight {tuple(weight.shape)}")
    for axis, size, tube in (("T", T, t), ("H", H, h), ("W", W, w)):
        if size < tube:
            raise ValueError(
                f"{op}: video {axis}={size} is smaller than the tubelet's {tube} along it; "
                f"expected at least one tubelet (video {tuple(video.shape)}, tubelet {(t, h, w)})"
            )
    if bias is not None and bias.shape != (D,):
        raise ValueError(f"{op}: bias must have shape ({D},) to match weight, got {tuple(bias.shape)}")
    shape = TubeletShape.of(video.shape, weight.shape, video.stride())
    if pos_embed is not None:
        nt, ns = shape.tokens
        allowed = [(nt, ns, D), (1, nt, ns, D), (nt * ns, D), (1, nt * ns, D)]
        if tuple(pos_embed.shape) not in allowed:
            raise ValueError(
                f"{op}: pos_embed has shape {tuple(pos_embed.shape)}; expected one of {', '.join(map(str, allowed))} "
                f"for a {nt} x {ns} token grid of dim {D}"
            )
    return shape
