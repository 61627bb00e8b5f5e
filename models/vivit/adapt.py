"""Pure functions over state dicts: other layouts -> ours, and image ViT -> video ViViT (paper section 3.4).

Nothing here touches a model: each function takes tensors (and the target's state dict, for
its key names and shapes) and returns tensors, plus a `LoadReport` saying what became of every key.
Our layout is timm's VisionTransformer layout, so a timm state dict needs no renaming.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vivit_kernels.checks import check_choice

from .config import ViViTConfig

StateDict = Mapping[str, torch.Tensor]
TUBELET_INITS = ("central_frame", "inflate")
TEMPORAL_ATTN_INITS = ("copy", "random")
TEMPORAL_ENCODER_INITS = ("random", "image")


@dataclass
class LoadReport:
    """What a checkpoint load did with every key.

    loaded: model keys copied unchanged from the checkpoint.
    adapted: model key -> how its tensor was derived (inflated, tiled, resampled, zeroed, ...).
    skipped: checkpoint key -> why it was not used.
    missing: model keys the checkpoint did not provide (left at the model's initialisation).
    """

    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)}, adapted {len(self.adapted)}, skipped {len(self.skipped)}, "
            f"missing (model's own init) {len(self.missing)}"
        ]
        lines += [f"  adapted {key}: {how}" for key, how in _collapse(self.adapted).items()]
        lines += [f"  skipped {key}: {why}" for key, why in _collapse(self.skipped).items()]
        lines += [f"  missing {key}" for key in _collapse(dict.fromkeys(self.missing, ""))]
        return "\n".join(lines)


def _collapse(entries: dict[str, str]) -> dict[str, str]:
    """Per-block keys with the same note shown once, as blocks.{0-11}.…: a report of a 32-block
    model stays short."""
    groups: dict[tuple[str, str], list[int]] = {}
    for key, note in entries.items():
        match = re.search(r"blocks\.(\d+)\.", key)
        if match is None:
            groups[(key, note)] = []
            continue
        pattern = key[: match.start()] + "blocks.{}." + key[match.end() :]
        groups.setdefault((pattern, note.replace(f"blocks.{match[1]}.", "blocks.{}.")), []).append(int(match[1]))
    out: dict[str, str] = {}
    for (pattern, note), indices in groups.items():
        span = "{" + _ranges(indices) + "}" if indices else ""
        out[pattern.replace("{}", span) if indices else pattern] = note.replace("{}", span)
    return out


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    parts, start = [], None
    indices = sorted(set(indices))
    for i, value in enumerate(indices):
        start = value if start is None else start
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(value) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def shape_error(key: str, source: torch.Tensor | tuple, target: torch.Tensor | tuple, why: str = "") -> ValueError:
    """The error for a checkpoint tensor that cannot be made to fit: names the key and both shapes."""
    source_shape = tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source)
    target_shape = tuple(target.shape) if isinstance(target, torch.Tensor) else tuple(target)
    return ValueError(
        f"cannot load {key!r}: checkpoint shape {source_shape} does not fit model shape {target_shape}"
        + (f" ({why})" if why else "")
    )


# Hugging Face ViT / ViViT per-layer names -> timm's: the hub's files (and transformers 4) use
# the first set, transformers 5 models' own state dicts the second.
_HF_LAYER = {
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_HF_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "layernorm": "norm",
    "classifier": "head",
}
_HF_PREFIX = re.compile(r"^(?:vit\.|vivit\.)?")


def is_hf_layout(state_dict: StateDict) -> bool:
    """Does the state dict use Hugging Face ViT / ViViT names (`[vit.|vivit.]embeddings...`)?"""
    return any(_HF_PREFIX.sub("", key).startswith("embeddings.patch_embeddings.") for key in state_dict)


def hf_to_timm(state_dict: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename a Hugging Face `ViTModel` / `ViTForImageClassification` / `VivitForVideoClassification`
    state dict to timm's names, concatenating query/key/value into one qkv projection.

    Returns (renamed state dict, {HF key: why it was dropped}) for keys with no timm counterpart
    (pooler, mask token).
    """
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name = _HF_PREFIX.sub("", key)
        layer = re.match(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$", name)
        if layer:
            i, module, kind = int(layer[1]), layer[2], layer[3]
            if module in _HF_QKV:
                qkv.setdefault((i, kind), {})[_HF_QKV[module]] = tensor
            elif module in _HF_LAYER:
                out[f"blocks.{i}.{_HF_LAYER[module]}.{kind}"] = tensor
            else:
                dropped[key] = "no counterpart in the timm layout"
            continue
        base, _, kind = name.rpartition(".")
        if name in _HF_TOP:
            out[_HF_TOP[name]] = tensor
        elif base in _HF_TOP and kind in ("weight", "bias"):
            out[f"{_HF_TOP[base]}.{kind}"] = tensor
        else:
            dropped[key] = "no counterpart in the timm layout"
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"layer {i}: attention {kind} needs query, key and value, got only {sorted(parts)}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, dropped


def inflate(weight_2d: torch.Tensor, frames: int) -> torch.Tensor:
    """A tubelet filter from a 2D patch filter, repeated over t and divided by t (ViViT eq. 8).

    (D, C, h, w) -> (D, C, t, h, w). On a static clip the tubelet embedding then equals the
    2D patch embedding of the frame.
    """
    _check_2d_filter(weight_2d, frames)
    return weight_2d.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames


def central_frame(weight_2d: torch.Tensor, frames: int) -> torch.Tensor:
    """A tubelet filter that sees only the centre frame floor(t / 2) of each tube (ViViT eq. 9).

    (D, C, h, w) -> (D, C, t, h, w), zeros at every other frame.
    """
    _check_2d_filter(weight_2d, frames)
    weight = weight_2d.new_zeros(weight_2d.shape[:2] + (frames,) + weight_2d.shape[2:])
    weight[:, :, frames // 2] = weight_2d
    return weight


def _check_2d_filter(weight_2d, frames) -> None:
    if not isinstance(weight_2d, torch.Tensor) or weight_2d.dim() != 4:
        got = tuple(weight_2d.shape) if isinstance(weight_2d, torch.Tensor) else type(weight_2d).__name__
        raise ValueError(f"expected a 2D patch filter (D, C, h, w), got {got}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"tubelet length t must be a positive int, got {frames!r}")


def resample_pos_embed(grid_embed: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """(1, gh * gw, D) row-major grid positions -> (1, nh * nw, D), bilinear (unchanged when equal)."""
    if tuple(old) == tuple(new):
        return grid_embed
    D = grid_embed.shape[-1]
    image = grid_embed.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(new), mode="bilinear", align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(grid_embed.dtype)


def resample_video_pos_embed(
    pos_embed: torch.Tensor, old: tuple[int, int, int], new: tuple[int, int, int], num_prefix_tokens: int = 0
) -> torch.Tensor:
    """A video's positional embedding on another token grid, resampled over time and space as a video.

    (1, P + nt * nh * nw, D), time-major grid positions after P prefix (CLS) positions ->
    (1, P + nt' * nh' * nw', D): trilinear over (t, h, w), prefix positions unchanged; the same
    tensor when the grids are equal. A grid of one frame is resampled bilinearly in space, one
    of 1 x 1 positions (model 2's temporal encoder) linearly in time.
    """
    old, new = tuple(old), tuple(new)
    if pos_embed.dim() != 3 or pos_embed.shape[1] != num_prefix_tokens + math.prod(old):
        raise ValueError(
            f"pos_embed of shape {tuple(pos_embed.shape)} does not hold {num_prefix_tokens} prefix position(s) "
            f"and a {old} grid"
        )
    if old == new:
        return pos_embed
    D = pos_embed.shape[-1]
    grid = pos_embed[:, num_prefix_tokens:].reshape(1, *old, D).permute(0, 4, 1, 2, 3).float()
    grid = F.interpolate(grid, size=new, mode="trilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new), D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :num_prefix_tokens], grid], dim=1)


def video_pos_grids(config: ViViTConfig) -> dict[str, tuple[int, int, int]]:
    """The (t, h, w) grid each positional embedding of a model of `config` covers: model 2's
    spatial encoder sees one frame and its temporal encoder one position per frame."""
    nt, nh, nw = config.grid
    if config.variant == "factorised_encoder":
        return {"pos_embed": (1, nh, nw), "temporal.pos_embed": (nt, 1, 1)}
    return {"pos_embed": (nt, nh, nw)}


def video_to_video(
    source: StateDict, source_config: ViViTConfig, target: StateDict, config: ViViTConfig
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A ViViT state dict initialised from another ViViT's of the same architecture (fine-tuning a
    video model on other data).

    Args:
        source: the pretrained video model's state dict (our layout; `hf_to_timm` converts a
            Hugging Face ViViT's).
        source_config: its config.
        target: the model's own state dict (the key names, shapes and dtypes to fill).
        config: the model's config. Only the input (num_frames, img_size) and num_classes may
            differ from `source_config`; compare the rest first (`config_differences`).

    Returns:
        (state dict, LoadReport). Weights of the same shape load as they are; positional
        embeddings on another token grid are resampled over time and space as a video
        (`resample_video_pos_embed`); a head of another class count is skipped (the model
        keeps its own, new head).

    Raises:
        ValueError naming the key and both shapes for any other tensor that does not fit.
    """
    out: dict[str, torch.Tensor] = {}
    report = LoadReport()
    old_grids, new_grids = video_pos_grids(source_config), video_pos_grids(config)
    prefix = int(config.has_cls_token)
    for key, want in target.items():
        tensor = source.get(key)
        if tensor is None:
            report.missing.append(key)
            continue
        how = None
        if key in new_grids and old_grids[key] != new_grids[key]:
            tensor = resample_video_pos_embed(tensor, old_grids[key], new_grids[key], prefix)
            how = (
                f"resampled over time and space, {'x'.join(map(str, old_grids[key]))} -> "
                f"{'x'.join(map(str, new_grids[key]))} (t x h x w)"
            )
        elif key.startswith("head.") and tensor.shape != want.shape:
            report.skipped[key] = (
                f"class count differs: checkpoint {tuple(tensor.shape)}, model {tuple(want.shape)}: a new head"
            )
            continue
        _place(out, report, key, tensor, want, how)
    for key in source:
        if key not in target:
            report.skipped[key] = "not in the model"
    return out, report


def _place(
    out: dict[str, torch.Tensor],
    report: LoadReport,
    key: str,
    tensor: torch.Tensor,
    want: torch.Tensor,
    how: str | None = None,
) -> None:
    """out[key] = a copy of `tensor` in `want`'s dtype, reported as loaded (or adapted `how`);
    ValueError naming the key and both shapes when they differ."""
    if tuple(tensor.shape) != tuple(want.shape):
        raise shape_error(key, tensor, want)
    out[key] = tensor.detach().to(dtype=want.dtype).clone()
    if how is None:
        report.loaded.append(key)
    else:
        report.adapted[key] = how


def tile_pos_embed(grid_embed: torch.Tensor, frames: int) -> torch.Tensor:
    """(1, S, D) -> (1, frames * S, D): the image grid repeated for every frame, frame-major."""
    return grid_embed.repeat(1, frames, 1)


def split_pos_embed(
    pos_embed: torch.Tensor, has_cls: bool, image_grid: tuple[int, int] | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, int]]:
    """An image ViT's (1, [1 +] gh * gw, D) positional embedding -> (CLS position or None, grid part, (gh, gw)).

    The grid is `image_grid` when given, else taken as square; the CLS position is present when
    the length is one more than the grid (timm also stores grids without it: `no_embed_class`).
    """
    if pos_embed.dim() == 2:
        pos_embed = pos_embed.unsqueeze(0)
    n = pos_embed.shape[1]
    if image_grid is not None:
        prefix = n - image_grid[0] * image_grid[1]
        if prefix not in (0, 1):
            raise ValueError(f"pos_embed of {n} positions does not hold a {tuple(image_grid)} grid (+ CLS)")
    else:
        prefix = 1 if has_cls and _is_square(n - 1) else 0
        if not _is_square(n - prefix):
            raise ValueError(
                f"pos_embed of {n} positions is not a square grid (+ CLS); pass image_grid=(gh, gw) for a non-square one"
            )
        side = math.isqrt(n - prefix)
        image_grid = (side, side)
    cls = pos_embed[:, :prefix] if prefix else None
    return cls, pos_embed[:, prefix:], tuple(image_grid)


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def check_inits(op: str, tubelet_init: str, temporal_attn_init: str, temporal_encoder_init: str) -> None:
    """ValueError naming `op` and the argument unless each initialisation is one `image_to_video` knows."""
    for name, value, allowed in (
        ("tubelet_init", tubelet_init, TUBELET_INITS),
        ("temporal_attn_init", temporal_attn_init, TEMPORAL_ATTN_INITS),
        ("temporal_encoder_init", temporal_encoder_init, TEMPORAL_ENCODER_INITS),
    ):
        check_choice(op, name, value, allowed)


def image_to_video(
    image: StateDict,
    target: StateDict,
    config: ViViTConfig,
    *,
    tubelet_init: str = "central_frame",
    temporal_attn_init: str = "copy",
    temporal_encoder_init: str = "random",
    image_grid: tuple[int, int] | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A ViViT state dict initialised from an image ViT's (timm layout), as the paper's section 3.4.

    Args:
        image: the image ViT's state dict, timm names (see `hf_to_timm` for Hugging Face ones).
        target: the ViViT's own state dict (its keys, shapes and dtypes are the target).
        config: the ViViT's config.
        tubelet_init: "central_frame" (the 2D filter at frame t // 2, zeros elsewhere) or
            "inflate" (the 2D filter repeated over t, divided by t).
        temporal_attn_init: model 3's temporal MSA: "copy" its LayerNorm and qkv from the same
            block's spatial MSA, or "random" (the model's init). Its output projection is zeroed
            either way, so every temporal MSA starts as the identity and still learns.
        temporal_encoder_init: model 2's temporal encoder: "random", or "image" (blocks and
            norm from the image model's first `temporal_depth` blocks and final norm).
        image_grid: the image model's (gh, gw) patch grid when it is not square.

    Returns:
        (state dict holding every key it could fill, LoadReport). Positional embeddings are
        resampled bilinearly to the video's spatial grid and tiled over n_t frames; the head
        is kept only when its shape (class count) matches.

    Raises:
        ValueError naming the key and both shapes when a tensor cannot be adapted (another
        width, channel count or patch size).
    """
    check_inits("image_to_video", tubelet_init, temporal_attn_init, temporal_encoder_init)
    out: dict[str, torch.Tensor] = {}
    report = LoadReport()
    used: set[str] = set()

    def put(key: str, tensor: torch.Tensor, how: str | None = None) -> None:
        _place(out, report, key, tensor, target[key], how)

    for key, want in target.items():
        if key == "patch_embed.proj.weight":
            _adapt_patch_filter(image, want, config, tubelet_init, put, used)
        elif key == "pos_embed":
            _adapt_pos_embed(image, want, config, image_grid, put, used)
        elif key == "head.weight" or key == "head.bias":
            _adapt_head(image, key, want, put, used, report)
        elif (m := re.fullmatch(r"blocks\.(\d+)\.temporal_(norm|attn)\.(.+)", key)) is not None:
            _adapt_temporal_msa(image, key, m, want, temporal_attn_init, put, used, report)
        elif key.startswith("temporal."):
            source_key = key.removeprefix("temporal.")
            if (
                temporal_encoder_init == "image"
                and source_key not in ("cls_token", "pos_embed")
                and source_key in image
            ):
                used.add(source_key)
                put(key, image[source_key], f"from {source_key}")
            else:
                report.missing.append(key)
        elif key in image:
            used.add(key)
            put(key, image[key])
        else:
            report.missing.append(key)
    for key in image:
        if key not in used:
            # timm's fc_norm normalises the pooled feature; our norm acts on the tokens before pooling.
            why = (
                "the image model normalises after pooling (fc_norm), this model before (norm): not equivalent"
                if key.startswith("fc_norm.")
                else "not in the model"
            )
            report.skipped.setdefault(key, why)
    return out, report


def _adapt_head(image, key, want, put, used, report: LoadReport) -> None:
    """The head's `key`, kept only when the class count matches."""
    source = image.get(key)
    if source is not None and source.shape != want.shape:
        used.add(key)
        report.skipped[key] = f"class count differs: checkpoint {tuple(source.shape)}, model {tuple(want.shape)}"
    elif source is not None:
        used.add(key)
        put(key, source)
    else:
        report.missing.append(key)


def _adapt_temporal_msa(image, key, match: re.Match, want, temporal_attn_init, put, used, report: LoadReport) -> None:
    """Model 3's temporal MSA `key` (`match`: block, norm or attn, the rest of the key)."""
    i, part, rest = match[1], match[2], match[3]
    if part == "attn" and rest.startswith("proj."):
        put(key, torch.zeros_like(want), "zero: the temporal MSA starts as the identity")
    elif temporal_attn_init == "copy":
        source_key = f"blocks.{i}.{'norm1' if part == 'norm' else 'attn'}.{rest}"
        if source_key in image:
            used.add(source_key)
            put(key, image[source_key], f"from {source_key}")
        else:
            report.missing.append(key)
    else:
        report.missing.append(key)


def _adapt_patch_filter(image, want, config, tubelet_init, put, used) -> None:
    key = "patch_embed.proj"
    source = image.get(f"{key}.weight")
    if source is None:
        raise ValueError(f"the image checkpoint has no '{key}.weight' (a timm / Hugging Face ViT was expected)")
    used.add(f"{key}.weight")
    D, C, t, h, w = want.shape
    if source.dim() == 5 and tuple(source.shape) == tuple(want.shape):
        put(f"{key}.weight", source)
        return
    if source.dim() != 4 or tuple(source.shape) != (D, C, h, w):
        raise shape_error(
            f"{key}.weight",
            source,
            want,
            "a 2D patch filter (D, C, h, w) of the same width, channels and patch size is needed",
        )
    adapt = central_frame if tubelet_init == "central_frame" else inflate
    put(f"{key}.weight", adapt(source, t), f"{tubelet_init} over t={t}")


def _adapt_pos_embed(image, want, config: ViViTConfig, image_grid, put, used) -> None:
    source = image.get("pos_embed")
    if source is None:
        raise ValueError("the image checkpoint has no 'pos_embed'")
    used.add("pos_embed")
    if source.shape[-1] != want.shape[-1]:
        raise shape_error("pos_embed", source, want, "embedding widths differ")
    cls, grid, old = split_pos_embed(source, "cls_token" in image, image_grid)
    nt, nh, nw = config.grid
    steps = []
    grid = resample_pos_embed(grid, old, (nh, nw))
    if old != (nh, nw):
        steps.append(f"resampled bilinearly {old[0]}x{old[1]} -> {nh}x{nw}")
    if config.variant != "factorised_encoder":  # model 2's spatial encoder takes one frame's grid
        grid = tile_pos_embed(grid, nt)
        steps.append(f"tiled over {nt} frames")
    if config.has_cls_token:
        if cls is None:
            cls = grid.new_zeros(1, 1, grid.shape[-1])
            steps.append("zero CLS position (the checkpoint has none)")
        grid = torch.cat([cls, grid], dim=1)
    elif cls is not None:
        steps.append("CLS position dropped")
    put("pos_embed", grid, ", ".join(steps) if steps else None)
