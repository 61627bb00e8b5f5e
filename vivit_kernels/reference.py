"""Naive implementations: the baseline of every benchmark and the oracle of every test.

They are written to be obviously right (einops to group the tokens, einsum, softmax) and
keep the full probability matrix of every attention group, as hand-written code would.
Inputs are assumed valid: the public ops in `vivit_kernels.attention` / `.tubelet` check them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .checks import default_scale


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale) v over the last two dims: (..., L, Dh) -> (..., L, Dh)."""
    scores = torch.einsum("...id,...jd->...ij", q, k) * scale
    probs = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.einsum("...ij,...jd->...id", probs, v)


# Each mode regroups the time-major token axis (t s) so that one attention group sits in the
# second-to-last dim; "joint" keeps every token in one group.
_GROUPINGS = {
    "spatial": ("b h (t s) d -> b h t s d", "b h t s d -> b h (t s) d"),  # a frame's S tokens
    "temporal": ("b h (t s) d -> b h s t d", "b h s t d -> b h (t s) d"),  # one spatial index, T frames
}


def factorised_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    mode: str,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention over a (frames x space) token grid. q, k, v: (B, H, N, Dh), N = frames * S, time-major."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if mode == "joint":
        return attend(q, k, v, scale, dropout_p)
    if mode == "split":
        half = q.shape[1] // 2
        spatial = factorised_attention(q[:, :half], k[:, :half], v[:, :half], frames, "spatial", scale, dropout_p)
        temporal = factorised_attention(q[:, half:], k[:, half:], v[:, half:], frames, "temporal", scale, dropout_p)
        return torch.cat([spatial, temporal], dim=1)
    group, ungroup = _GROUPINGS[mode]
    q, k, v = (rearrange(x, group, t=frames) for x in (q, k, v))
    return rearrange(attend(q, k, v, scale, dropout_p), ungroup)


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
