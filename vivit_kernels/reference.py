"""Naive implementations: the baseline of every benchmark and the oracle of every test.

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


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims: (..., L, Dh) -> (..., L, Dh).

    Scores, softmax and the weighted sum run in float32 at least: half-precision logits of
    magnitude ~1e4 would overflow (inf, then NaN), where the fused kernels accumulate in float32.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("...id,...jd->...ij", q.to(compute), k.to(compute)) * scale
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("...ij,...jd->...id", probs, v.to(compute)).to(q.dtype)


# The grid tokens, (t s) time-major or (s t) space-major, as a (frames, tokens_per_frame) grid.
GRID = {"time_major": "b h (t s) d", "space_major": "b h (s t) d"}


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttentionShape,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`shape`'s mode as groups of tokens, each group run through `attend`.

    q, k, v: (B, H, N, Dh), N = P + frames * S; tokens [0, P) are the prefix (class or register
    tokens), the rest the grid in `shape.layout` order (time-major: t * S + s; space-major:
    s * T + t). `attend(q, k, v)` is softmax attention over the last two dims of (..., L, Dh)
    tensors: (B, H, N, Dh) for joint and for a temporal head's prefix, (B, H, G, L, Dh) for the
    grid's G groups of L tokens. joint: every token attends to all N. spatial: a grid token attends
    to the prefix and its frame; a prefix token attends to the prefix and each frame in turn, and
    its T outputs are averaged (TimeSformer). temporal: a grid token attends to its spatial
    position's T tokens, a prefix token to the prefix. split: the first half of the heads spatial,
    the second temporal.
    """
    if shape.mode == "joint":
        return attend(q, k, v)
    if shape.mode == "split":
        half = shape.heads // 2
        halves = []
        for heads, mode in ((slice(None, half), "spatial"), (slice(half, None), "temporal")):
            part = replace(shape, heads=q[:, heads].shape[1], mode=mode)
            halves.append(grouped_attention(q[:, heads], k[:, heads], v[:, heads], part, attend))
        return torch.cat(halves, dim=1)
    P, T, grid = shape.prefix, shape.frames, GRID[shape.layout]
    prefix = [x[:, :, :P] for x in (q, k, v)]
    # (b h t s d): one frame per index of dim 2.
    frames = [rearrange(x[:, :, P:], f"{grid} -> b h t s d", t=T) for x in (q, k, v)]
    if shape.mode == "spatial":
        # Each frame's group is the prefix followed by the frame's tokens.
        groups = [torch.cat([p.unsqueeze(2).expand(-1, -1, T, -1, -1), f], dim=3) for p, f in zip(prefix, frames)]
        out = attend(*groups)  # (b h t P+S d)
        prefix_out, grid_out = out[:, :, :, :P].mean(dim=2), out[:, :, :, P:]
    else:  # temporal: a grid token's group is its spatial position across frames; the prefix attends to itself
        columns = [f.transpose(2, 3) for f in frames]  # (b h s t d)
        grid_out = attend(*columns).transpose(2, 3)
        # Without a prefix, no attention over an empty slice: autograd would keep its base, the whole q/k/v.
        prefix_out = attend(*prefix) if P else None
    grid_out = rearrange(grid_out, f"b h t s d -> {grid}")
    return grid_out if prefix_out is None else torch.cat([prefix_out, grid_out], dim=2)


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
    return grouped_attention(q, k, v, shape, functools.partial(attend, scale=scale, dropout_p=dropout_p))


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
