"""Factorised attention over a (frames x space) token grid: the functional op and the module."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .checks import (
    AttentionShape,
    check_attention,
    check_attention_packed,
    check_heads,
    check_layout,
    check_mode,
    check_positive_int,
    check_prefix,
    grid_mismatch,
)
from .lean import norm_linear, plain_linear, stacked_linear
from .ops.library import autocast_inputs


def factorised_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    mode: str,
    scale: float | None = None,
    *,
    num_prefix_tokens: int = 0,
    layout: str = "time_major",
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention restricted to the groups a ViViT mode defines.

    Args:
        q, k, v: (B, H, N, Dh), any strides; views of one packed (B, N, 3, H, Dh) qkv
            projection are the normal case and are read without a copy by the fused backends.
        frames: T. N = P + T * S tokens: P prefix tokens (class, register tokens), then the
            (T x S) grid.
        mode: which tokens attend to which (see the table below); "split" needs an even H.
        scale: logit scale, Dh ** -0.5 when None (as in F.scaled_dot_product_attention).
        num_prefix_tokens: P, tokens [0, P) outside the grid (timm's name).
        layout: order of the grid tokens: "time_major" (token P + t * S + s; ViViT, timm) or
            "space_major" (token P + s * T + t; TimeSformer). Read in place either way.
        dropout_p: dropout on the attention probabilities (reference and sdpa backends).
        backend: "auto", or a registered backend ("triton", "cpu", "sdpa", "reference").

        ============  =============================  =====================================
        mode          a grid token attends to        a prefix token attends to
        ============  =============================  =====================================
        joint         all N tokens                   all N tokens
        spatial       the prefix + its frame's S     the prefix + each frame in turn; its T
                                                     outputs are averaged (TimeSformer)
        temporal      its position's T tokens        the prefix
        split         heads [0, H/2) spatial, heads [H/2, H) temporal
        ============  =============================  =====================================

    Returns:
        (B, H, N, Dh), the dtype and device of q.

    Non-finite input never crashes: a NaN or inf in q/k/v makes NaN the output rows whose group
    contains it. The reference, sdpa and cpu backends keep it to those rows; the triton backend
    packs short groups (shorter than its tile) into one tile, where a non-finite v (and, in
    backward, any non-finite input) also reaches the other groups of that tile.
    """
    selected, shape, (q, k, v) = _dispatch(q, k, v, frames, mode, scale, num_prefix_tokens, layout, dropout_p, backend)
    return selected.run(q, k, v, shape)


def factorised_attention_packed(
    qkv: torch.Tensor,
    num_heads: int,
    frames: int,
    mode: str,
    scale: float | None = None,
    *,
    num_prefix_tokens: int = 0,
    layout: str = "time_major",
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """`factorised_attention` on the packed projection a layer computes: the normal path.

    Args:
        qkv: (B, N, 3 * H * Dh), any strides: the output of a D -> 3 * H * Dh linear layer,
            q, k, v side by side, each (H, Dh) head-major (timm's and our `qkv` layout).
        num_heads: H.
        frames, mode, scale, num_prefix_tokens, layout, dropout_p, backend: as `factorised_attention`.

    Returns:
        (B, N, H * Dh), the input of the output projection. The fused backends read q, k, v as
        views of `qkv`, return a buffer laid out as the output projection reads it, and in
        backward write the gradient of `qkv` in place as one buffer (no stack of three gradients,
        no copy into the projection's gradient).
    """
    if isinstance(qkv, torch.Tensor):  # autocast casts as for SDPA, before a backend is chosen for the dtype
        (qkv,) = autocast_inputs((qkv,), qkv.device.type)
    shape = check_attention_packed(qkv, num_heads, frames, mode, scale, dropout_p, num_prefix_tokens, layout)
    selected = backends.select(backends.Request("attention_packed", qkv.device, qkv.dtype, shape), backend)
    return selected.run(qkv, shape)


def attention_backend(*args, **kwargs) -> str:
    """The name of the backend `factorised_attention(*args, **kwargs)` runs on; nothing is computed."""
    call = inspect.signature(factorised_attention).bind(*args, **kwargs)
    call.apply_defaults()
    return _dispatch(**call.arguments)[0].name


def _dispatch(
    q, k, v, frames, mode, scale, num_prefix_tokens, layout, dropout_p, backend
) -> tuple[backends.Selected, AttentionShape, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    if isinstance(q, torch.Tensor):  # autocast casts as for SDPA, before a backend is chosen for the dtype
        q, k, v = autocast_inputs((q, k, v), q.device.type)
    shape = check_attention(q, k, v, frames, mode, scale, dropout_p, num_prefix_tokens, layout)
    return backends.select(backends.Request("attention", q.device, q.dtype, shape), backend), shape, (q, k, v)


def _checked_mask(mask, mode: str, B: int, H: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """`mask` checked against (B, H, N, N) scores, float masks in the scores' dtype (SDPA requires it)."""
    op = "FactorisedAttention"
    if mode != "joint":
        raise ValueError(
            f"{op}: attn_mask is honoured in mode='joint' only; in mode {mode!r} the mode is the mask (it defines "
            "which tokens attend to which)"
        )
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"{op}: attn_mask must be a torch.Tensor (bool, or float added to the logits), got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(
            f"{op}: attn_mask must be bool (True attends) or floating (added to the logits), got {mask.dtype}"
        )
    expected = (B, H, N, N)
    fits = 2 <= mask.dim() <= 4 and mask.shape[-1] == N
    fits = fits and all(m in (1, e) for m, e in zip(reversed(mask.shape), reversed(expected)))
    if not fits:
        raise ValueError(
            f"{op}: attn_mask of shape {tuple(mask.shape)} does not fit the scores (B, H, N, N) = {expected}; expected "
            f"a shape broadcastable to them with the N={N} keys last, e.g. ({B}, 1, 1, {N}) key padding or "
            f"({B}, 1, {N}, {N})"
        )
    return mask if mask.dtype in (torch.bool, dtype) else mask.to(dtype)


class FactorisedAttention(nn.Module):
    """Multi-head self-attention over video tokens, factorised over space and time.

    A drop-in for timm's `Attention`: the parameters are `qkv`, `proj` (and `q_norm`, `k_norm`
    with qk_norm), so a timm `Attention` state dict loads unchanged; with mode="joint" it
    computes the same function. Without a key bias (VideoMAE, BEiT) the query and value biases
    are `q_bias` and `v_bias` and the key bias is a zero buffer that is never trained.

    Masks and attention weights: with mode="joint", `forward(x, attn_mask=...)` honours a mask as
    timm's `Attention` does (bool or additive float, broadcastable to (B, H, N, N), key padding
    included); a masked call runs torch SDPA on views of the packed qkv (with the module's scale
    and dropout), an unmasked one the fused kernels. The other modes refuse a mask: the mode is
    the mask. The attention weights are never returned: the fused kernels never form them.

    Args:
        dim: token width D.
        num_heads: number of heads H (even for "split").
        mode: "joint", "spatial", "temporal" or "split" (see `factorised_attention`).
        qkv_bias: learn biases for the q, k, v projections.
        attn_drop: dropout on the attention probabilities, kept as the `nn.Dropout` module
            `attn_drop` as in timm (the op reads its `p`, in training only; the fused kernels do
            not implement it: with attn_drop > 0 training runs torch SDPA).
        proj_drop: dropout after the output projection (the `nn.Dropout` module `proj_drop`).
        scale: logit scale, head_dim ** -0.5 when None.
        frames: T for (B, N, D) inputs when `forward` is not told it.
        backend: backend for the attention op ("auto" picks the fastest that fits).
        tokens_per_frame: S, the patch grid of one frame (the image's, fixed): T is then derived
            from each input's N, so clips of any length are read right.
        num_prefix_tokens: P, tokens before the grid (class / register tokens).
        layout: "time_major" or "space_major" order of the grid tokens.
        head_dim: width of a head; default dim // num_heads (the inner width H * head_dim may
            differ from dim, as in vit-pytorch).
        qk_norm: normalise q and k over the head dim before attention (timm's qk_norm).
        norm_layer: the constructor of the qk_norm layers, called as `norm_layer(head_dim,
            device=..., dtype=...)` (timm's); nn.LayerNorm when None.
        proj_bias: learn a bias for the output projection.
        key_bias: with qkv_bias, learn a key bias too (False: VideoMAE / BEiT style).
        device, dtype: where and in which dtype the parameters are created, as for nn.Linear.
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
        *,
        tokens_per_frame: int | None = None,
        num_prefix_tokens: int = 0,
        layout: str = "time_major",
        head_dim: int | None = None,
        qk_norm: bool = False,
        proj_bias: bool = True,
        key_bias: bool = True,
        norm_layer: Callable[..., nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        op = "FactorisedAttention"
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{op}: dim={dim} is not divisible by num_heads={num_heads}")
            head_dim = dim // num_heads
        check_positive_int(op, "head_dim", head_dim)
        check_mode(op, mode)
        check_heads(op, mode, num_heads, "num_heads")
        check_layout(op, layout)
        check_prefix(op, num_prefix_tokens)
        for name, value in (("frames", frames), ("tokens_per_frame", tokens_per_frame)):
            if value is not None:
                check_positive_int(op, name, value)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.mode = mode
        self.scale = scale
        self.frames = frames
        self.tokens_per_frame = tokens_per_frame
        self.num_prefix_tokens = num_prefix_tokens
        self.layout = layout
        self.backend = backend
        dd = dict(device=device, dtype=dtype)
        inner = num_heads * head_dim
        separate_biases = qkv_bias and not key_bias
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias and key_bias, **dd)
        if separate_biases:
            self.q_bias = nn.Parameter(torch.zeros(inner, **dd))
            self.register_buffer("k_bias", torch.zeros(inner, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(inner, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        norm_layer = nn.LayerNorm if norm_layer is None else norm_layer
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def grid_frames(self, tokens: int, frames: int | None = None) -> int:
        """T for an input of `tokens` tokens: derived from tokens_per_frame when the module has
        it (and checked against `frames` / the module's frames), else `frames` or the module's."""
        frames = self.frames if frames is None else frames
        S, P = self.tokens_per_frame, self.num_prefix_tokens
        if S is None:
            if frames is None:
                raise ValueError(
                    "FactorisedAttention: a (B, N, D) input needs frames=T or tokens_per_frame=S "
                    "(or pass x as (B, T, S, D))"
                )
            return frames
        if tokens <= P or (tokens - P) % S or (frames is not None and frames * S + P != tokens):
            raise ValueError(grid_mismatch("FactorisedAttention", tokens, P, frames, S))
        return (tokens - P) // S

    def forward(
        self,
        x: torch.Tensor,
        frames: int | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, S, D), or (B, N, D) with N = P + T * S (T from `frames`, the module's frames
        or its tokens_per_frame).

        attn_mask: mode="joint" only, as timm's `Attention` and F.scaled_dot_product_attention
        take it: bool (True attends) or float (added to the logits), broadcastable to
        (B, H, N, N) with the N keys last, e.g. (B, 1, 1, N) key padding or (B, 1, N, N).
        is_causal: only False (the mode defines which tokens attend to which).

        Returns x's shape.
        """
        op = "FactorisedAttention"
        if is_causal:
            raise ValueError(
                f"{op}: is_causal=True: attn_mask / is_causal are not supported beyond a mask in mode='joint'; the "
                f"mode ({self.mode!r}) defines which tokens attend to which"
            )
        if x.dim() == 4:
            if self.num_prefix_tokens:
                raise ValueError(f"{op}: a (B, T, S, D) input has no prefix tokens; pass (B, N, D) with them first")
            B, T, S, D = x.shape
            if frames is not None and frames != T:
                raise ValueError(f"{op}: x has T={T} frames but frames={frames} was given")
            if self.tokens_per_frame is not None and S != self.tokens_per_frame:
                raise ValueError(
                    f"{op}: x has S={S} tokens per frame, expected tokens_per_frame={self.tokens_per_frame}"
                )
            frames, N = T, T * S
        elif x.dim() == 3:
            B, N, D = x.shape
            frames = self.grid_frames(N, frames)
        else:
            raise ValueError(f"{op}: x must be (B, T, S, D) or (B, N, D), got shape {tuple(x.shape)}")
        if D != self.dim:
            raise ValueError(f"{op}: x has dim {D}, expected {self.dim}")

        out = self.attend(self.project_qkv(x.reshape(B, N, D)), frames, attn_mask=attn_mask)
        return out.reshape(x.shape)

    # The projections as the op reads them. A module converted from another library keeps that
    # library's parameters under their own names and overrides these (vivit_kernels.convert).
    @property
    def dim(self) -> int:
        """The token width D."""
        return self.qkv.in_features

    def project_qkv(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The packed projection (B, N, 3 * H * Dh) of tokens x (B, N, D), or of norm(x): then
        computed with the projection (`norm_linear`), keeping x for backward rather than norm(x),
        where the projection is a plain Linear. A projection wrapped by another library (an
        adapter's layer) is called as it is."""
        projection = self.qkv_projection()
        if projection is None:
            return self.call_qkv(x if norm is None else norm(x))
        weights, bias = projection
        if norm is None:
            return stacked_linear(x, weights, bias)
        return norm_linear(x, norm, weights, bias)

    def qkv_projection(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None] | None:
        """(qkv_weights, qkv_bias), or None where the projection is not a plain Linear (see `linear_qkv`)."""
        return (self.qkv_weights, self.qkv_bias) if self.linear_qkv else None

    def call_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The projection called as a module (one an adapter wraps), with the separate biases."""
        qkv = self.qkv(x)
        return qkv if self.q_bias is None else qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))

    @property
    def linear_qkv(self) -> bool:
        """Whether the projection is qkv_weights and qkv_bias as they are (no adapter around it)."""
        return plain_linear(self.qkv)

    @property
    def qkv_weights(self) -> tuple[torch.Tensor, ...]:
        """The weight of the qkv projection (3 * H * Dh, D), as the parts stacked along dim 0 that
        form it: here the one packed weight."""
        return (self.qkv.weight,)

    @property
    def qkv_bias(self) -> torch.Tensor | None:
        """The bias of the qkv projection (q, k, v side by side), with the zero key bias when there is none."""
        return self.qkv.bias if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection and its dropout on the attention's (B, N, H * Dh) output."""
        return self.proj_drop(self.proj(out))

    def attend(self, qkv: torch.Tensor, frames: int, *, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention and the output projection on the packed projection qkv (B, N, 3 * H * Dh) ->
        (B, N, D): what follows `qkv`. A block that computes qkv itself (e.g. with
        `vivit_kernels.norm_linear`, keeping less for backward) calls this. attn_mask: as `forward`."""
        B, N, _ = qkv.shape
        if attn_mask is not None:
            # The fused kernels take no mask: torch SDPA on views of the packed qkv, with our scale and dropout.
            mask = _checked_mask(attn_mask, self.mode, B, self.num_heads, N, qkv.dtype)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(
                self.q_norm(q),
                self.k_norm(k),
                v,
                attn_mask=mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=self.scale,
            )
            out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
            return self.project(out)
        options = dict(
            num_prefix_tokens=self.num_prefix_tokens,
            layout=self.layout,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            backend=self.backend,
        )
        if isinstance(self.q_norm, nn.Identity):
            # The packed op: q, k, v read in place, its gradient written into qkv's.
            out = factorised_attention_packed(qkv, self.num_heads, frames, self.mode, self.scale, **options)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = factorised_attention(self.q_norm(q), self.k_norm(k), v, frames, self.mode, self.scale, **options)
            # Fused backends return a (B, H, N, Dh) view of a (B, N, H, Dh) buffer: this reshape is free.
            out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.project(out)

    def extra_repr(self) -> str:
        extras = [f"mode={self.mode!r}", f"num_heads={self.num_heads}", f"head_dim={self.head_dim}"]
        for name, default in (
            ("frames", None),
            ("tokens_per_frame", None),
            ("num_prefix_tokens", 0),
            ("layout", "time_major"),
        ):
            if getattr(self, name) != default:
                extras.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(extras + [f"backend={self.backend!r}"])
