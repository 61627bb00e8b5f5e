"""Naive implementations: the oracle of every test (and the tubelet benchmarks' einsum baseline;
attention is measured against plain code of its own, benchmarks/attention.py).

They are written to be obviously right (einops to group the tokens, einsum, softmax) and
keep the full probability matrix of every attention group, as hand-written code would.
Inputs are assumed valid: the public ops in `vivit_kernels.attention` / `.tubelet` check them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from einops import rearrange

from .checks import AttentionShape, default_scale

SHORT_GROUP = 16  # keys: attend's groups up to this long (ViViT's temporal ones) put the keys first


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims: (..., L, Dh) -> (..., L, Dh).

    Scores, softmax and the weighted sum run in float32 at least: half-precision logits of
    magnitude ~1e4 would overflow (inf, then NaN), where the fused kernels accumulate in float32.
    """
    dtype, compute = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    # The scale multiplies the smaller of q and the scores: per query, Dh elements of one, L of the other.
    scale_scores = k.shape[-2] <= q.shape[-1]
    if not scale_scores:
        q = q * scale
    if k.shape[-2] <= SHORT_GROUP:
        # Scores as (..., keys, queries), softmax over the keys at dim -2: torch's CPU softmax over a
        # short last dim is slow (4x over 8 keys, measured against dim -2).
        scores, pattern, keys = torch.einsum("...jd,...id->...ji", k, q), "...ji,...jd->...id", -2
    else:
        scores, pattern, keys = torch.einsum("...id,...jd->...ij", q, k), "...ij,...jd->...id", -1
    probs = (scores * scale if scale_scores else scores).softmax(dim=keys)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum(pattern, probs, v).to(dtype)


# Each mode's grid groups as (B, G, H, L, Dh) views of q, k, v, keyed by (mode, layout), and an
# output of that shape back in token order, (B, A1, A2, H, Dh) with token a1 * A2 + a2: the layout
# an output projection reads. Flattening (B, G) hands attend a batch of groups that SDPA and bmm
# take as they are (a view where the strides allow, a copy where not, as einops gathers them).
GROUPS = {
    ("spatial", "time_major"): ("b h (t s) d -> b t h s d", "b t h s d -> b t s h d"),
    ("spatial", "space_major"): ("b h (s t) d -> b t h s d", "b t h s d -> b s t h d"),
    ("temporal", "time_major"): ("b h (t s) d -> b s h t d", "b s h t d -> b t s h d"),
    ("temporal", "space_major"): ("b h (s t) d -> b s h t d", "b s h t d -> b s t h d"),
}


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    contiguous: bool = False,
) -> torch.Tensor:
    """`shape`'s mode as groups of tokens, each group run through `attend`.

    q, k, v: (B, H, N, Dh), N = P + frames * S; tokens [0, P) are the prefix (class or register
    tokens), the rest the grid in `shape.layout` order (time-major: t * S + s; space-major:
    s * T + t). `attend(q, k, v)` is softmax attention over the last two dims of 4-D
    (batch, H, L, Dh) tensors: (B, H, N, Dh) for joint and for a temporal head's prefix,
    (B * G, H, L, Dh) for the grid's G groups of L tokens; `contiguous` hands it contiguous copies
    (einsum would copy strided groups itself, k transposed), else views where the strides allow.
    joint: every token attends to all N. spatial: a grid token attends to the prefix and its frame;
    a prefix token attends to the prefix and each frame in turn, and its T outputs are averaged
    (TimeSformer). temporal: a grid token attends to its spatial position's T tokens, a prefix
    token to the prefix. split: the first half of the heads spatial, the second temporal.

    Returns (B, H, N, Dh), a view of a (B, N, H, Dh) tensor, the layout an output projection reads:
    the output is copied once from the groups into it, and `grouped_attention_packed` adds no copy.
    """
    pieces = [_Pieces.apply(x, functools.partial(_pieces, shape=shape), contiguous) for x in (q, k, v)]
    return _attend_pieces(*pieces, shape, attend)


def grouped_attention_packed(
    qkv: torch.Tensor,
    shape: AttentionShape,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    contiguous: bool = False,
) -> torch.Tensor:
    """`grouped_attention` on a packed projection: (B, N, 3 * H * Dh) -> (B, N, H * Dh)."""
    pieces = _Pieces.apply(qkv, functools.partial(_packed_pieces, shape=shape), contiguous)
    n = len(pieces) // 3
    return _attend_pieces(pieces[:n], pieces[n : 2 * n], pieces[2 * n :], shape, attend).transpose(1, 2).flatten(2)


class _Pieces(torch.autograd.Function):
    """`views(source)`, as they are or as contiguous copies. The views tile source (each element in
    exactly one), so backward writes their gradients through the same views into one new tensor
    shaped like source: one copy, where autograd through the views would first reshape each
    gradient to its view's input (a copy) and then stack or concatenate them (another)."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, views: Callable, contiguous: bool) -> tuple[torch.Tensor, ...]:
        ctx.views, ctx.source_shape = views, source.shape
        return tuple(x.clone(memory_format=torch.contiguous_format) if contiguous else x for x in views(source))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        dsource = grads[0].new_empty(ctx.source_shape)
        for view, grad in zip(ctx.views(dsource), grads):
            view.copy_(grad)
        return dsource, None, None


def _pieces(x: torch.Tensor, shape: AttentionShape) -> list[torch.Tensor]:
    """The views of x (B, H, N, Dh) that `shape`'s mode attends over, tiling it: joint x itself;
    otherwise per mode (split: the spatial heads', then the temporal heads') the prefix
    (B, H, P, Dh) when P > 0, then the grid's groups (B, G, H, L, Dh) (see GROUPS)."""
    if shape.mode == "joint":
        return [x]
    if shape.mode == "split":
        half = shape.heads // 2
        return _pieces(x[:, :half], replace(shape, mode="spatial")) + _pieces(
            x[:, half:], replace(shape, mode="temporal")
        )
    P = shape.prefix
    grid = rearrange(x[:, :, P:], GROUPS[shape.mode, shape.layout][0], t=shape.frames)
    return [x[:, :, :P], grid] if P else [grid]


def _packed_pieces(qkv: torch.Tensor, shape: AttentionShape) -> list[torch.Tensor]:
    """`_pieces` of q, then of k, then of v, the (B, H, N, Dh) views of qkv (B, N, 3 * H * Dh)."""
    return [
        piece for x in qkv.unflatten(-1, (3, shape.heads, -1)).unbind(2) for piece in _pieces(x.transpose(1, 2), shape)
    ]


def _attend_pieces(q: list, k: list, v: list, shape: AttentionShape, attend: Callable) -> torch.Tensor:
    """`attend` over `_pieces` of q, k and v -> (B, H, N, Dh), a view of a (B, N, H, Dh) tensor."""
    if shape.mode == "split":
        n = 2 if shape.prefix else 1  # pieces per half
        halves = [
            _token_parts(q[part], k[part], v[part], replace(shape, mode=mode), attend)
            for part, mode in ((slice(None, n), "spatial"), (slice(n, None), "temporal"))
        ]
        # The halves' parts cover the same tokens: they meet along the heads, in one copy.
        parts = [torch.cat(pair, dim=-2) for pair in zip(*halves)]
    else:
        parts = _token_parts(q, k, v, shape, attend)
    # (B, n, [n2,] H, Dh) parts in token order -> (B, N, H, Dh), copied only where not already in place.
    out = parts[0].flatten(1, -3).contiguous() if len(parts) == 1 else torch.cat([p.flatten(1, -3) for p in parts], 1)
    return out.transpose(1, 2)


def _token_parts(q: list, k: list, v: list, shape: AttentionShape, attend: Callable) -> list[torch.Tensor]:
    """One mode's (not split's) output in token order, as views of what `attend` returned: the
    prefix's (B, P, H, Dh) unless P = 0, then the grid's (B, A1, A2, H, Dh) (see GROUPS)."""
    if shape.mode == "joint":
        return [attend(q[0], k[0], v[0]).transpose(1, 2)]
    grid, back = list(zip(q, k, v))[-1], GROUPS[shape.mode, shape.layout][1]
    B, T, H, _, Dh = grid[0].shape
    P = shape.prefix
    if P and shape.mode == "spatial":  # each frame's group is the prefix followed by the frame's tokens
        grid = [torch.cat([p.unsqueeze(1).expand(B, T, H, P, Dh), g], dim=3) for p, g in zip((q[0], k[0], v[0]), grid)]
    out = attend(*(g.flatten(0, 1) for g in grid)).unflatten(0, (B, -1))
    if not P:
        return [rearrange(out, back)]
    if shape.mode == "spatial":
        return [out[:, :, :, :P].mean(dim=1).transpose(1, 2), rearrange(out[:, :, :, P:], back)]
    # temporal: the prefix attends to itself (never to an empty slice, which autograd would keep
    # with its base, the whole q/k/v).
    return [attend(q[0], k[0], v[0]).transpose(1, 2), rearrange(out, back)]


def factorised_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    mode: str,
    scale: float | None = None,
    dropout_p: float = 0.0,
    num_prefix_tokens: int = 0,
    layout: str = "time_major",
) -> torch.Tensor:
    """Attention over [prefix tokens] + a (frames x tokens_per_frame) token grid, each group's
    full probability matrix kept: `grouped_attention` with `attend`.

    q, k, v: (B, H, N, Dh), N = P + frames * S; tokens [0, P) are the prefix, the rest the grid
    in `layout` order. The modes are those of `grouped_attention`.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    B, H, N, Dh = q.shape
    shape = AttentionShape(
        batch=B,
        heads=H,
        tokens=N,
        head_dim=Dh,
        frames=frames,
        mode=mode,
        scale=scale,
        dropout_p=dropout_p,
        prefix=num_prefix_tokens,
        layout=layout,
    )
    return grouped_attention(
        q, k, v, shape, functools.partial(attend, scale=scale, dropout_p=dropout_p), contiguous=True
    )


def tubelet_embedding(
    video: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-overlapping t x h x w tubes, linearly projected: (B, C, T, H, W) -> (B, nt, nh * nw, D).

    Like Conv3d with stride == kernel, trailing frames/rows/columns that do not fill a whole
    tubelet are dropped (nt = floor(T / t), ...).
    """
    D, C, t, h, w = weight.shape
    nt, nh, nw = video.shape[2] // t, video.shape[3] // h, video.shape[4] // w
    video = video[:, :, : nt * t, : nh * h, : nw * w]
    tubes = rearrange(video, "b c (nt t) (nh h) (nw w) -> b nt (nh nw) (c t h w)", t=t, h=h, w=w)
    tokens = torch.einsum("btsk,dk->btsd", tubes, weight.reshape(D, -1))
    if bias is not None:
        tokens = tokens + bias
    if pos_embed is not None:
        tokens = tokens + pos_embed.reshape(nt, nh * nw, D)
    return tokens
