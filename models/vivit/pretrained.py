"""Loading weights into a ViViT: from a pretrained image ViT (timm or Hugging Face), from a
Hugging Face ViViT checkpoint, or from another video ViViT to fine-tune. The tensor surgery
lives in `adapt.py`; this file reads files, checks them against the model and applies the result.

Every loader warns (one warning) about the model's parameters the checkpoint did not fill:
they keep their random initialisation, which is what a user most needs to know about a load.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .adapt import (
    LoadReport,
    _collapse,
    check_inits,
    hf_to_timm,
    image_to_video,
    is_hf_layout,
    shape_error,
    video_to_video,
)
from .checkpoint import CheckpointError, checkpoint_config, load_checkpoint
from .config import EXECUTION_FIELDS, TRAINING_ONLY_FIELDS, ViViTConfig, config_differences, format_differences
from .model import ViViT

Source = str | os.PathLike | Mapping[str, torch.Tensor]
# Hugging Face activation names -> ours: the tanh-approximated GELU goes by several names there.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors`, `.pth`, `.pt` or `.bin` file (or a Hugging Face
    `save_pretrained` directory), or a state dict as it is.

    Training checkpoints that wrap the weights (`{"model": ...}`, `{"state_dict": ...}`) and
    DistributedDataParallel's `module.` prefix are unwrapped. Files are read on the CPU,
    `torch.load` with `weights_only=True` (no code from the file runs).
    """
    return _unwrap(_read(source))


def _read(source: Source) -> dict[str, Any]:
    """What a checkpoint file (or save_pretrained directory) holds, as read; a mapping as it is."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):  # a save_pretrained directory
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor pytorch_model.bin")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        try:
            from safetensors import SafetensorError
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors needs safetensors: pip install safetensors") from None
        try:
            return load_file(path, device="cpu")
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    state = load_checkpoint(path)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _unwrap(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    for wrapper in ("model", "state_dict", "model_state"):
        if isinstance(state.get(wrapper), Mapping):
            state = dict(state[wrapper])
            break
    if state and all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise TypeError(f"checkpoint entries are not tensors: {bad[:5]}")
    return state


def read_pretrained(source: Source) -> tuple[dict[str, torch.Tensor], ViViTConfig | None]:
    """The weights at `source`, and the config of the video model they belong to (None for an image model).

    Video models: a Hugging Face ViViT `save_pretrained` directory (its config.json is read) or
    a `vivit-train` checkpoint (its model_spec). Anything else is taken as an image ViT.

    Raises:
        ValueError for a Hugging Face ViViT state dict without its config (frames, grid and
        activation cannot be told from the tensors alone); CheckpointError for an unreadable file.
    """
    raw = _read(source)
    config = None
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        hf_config = _read_hf_config(os.fspath(source))
        if hf_config is not None and hf_config.get("model_type") == "vivit":
            config = vivit_config_from_hf(hf_config)
    if isinstance(raw.get("model_spec"), Mapping) and isinstance(raw.get("model"), Mapping):
        config = checkpoint_config(raw, source if not isinstance(source, Mapping) else "the state")
    state = _unwrap(raw)
    if config is None and _is_hf_vivit(state):
        raise ValueError(
            "a Hugging Face ViViT state dict without its config.json: pass the save_pretrained "
            "directory, whose config gives the frames, grid and activation"
        )
    return state, config


def _timm_layout(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state dict in timm's names (converted from Hugging Face's when it has them), and the
    keys dropped by the conversion with why."""
    return hf_to_timm(state) if is_hf_layout(state) else (state, {})


def _is_hf_vivit(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith("vivit.embeddings.") for key in state)


def _read_hf_config(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable config.json ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a config (a JSON {type(config).__name__})")
    return config


def _warn_left_at_init(who: str, model: nn.Module, loaded: Mapping[str, torch.Tensor]) -> None:
    """One warning naming every parameter of `model` that `loaded` does not fill."""
    keys = list(model.state_dict())
    left = [key for key in keys if key not in loaded]
    if left:
        names = ", ".join(_collapse(dict.fromkeys(_whole_modules(keys, left), "")))
        warnings.warn(
            f"{who}: {len(left)} parameter(s) left at their initial values (not in the checkpoint): {names}",
            stacklevel=3,
        )


def _whole_modules(keys: list[str], left: list[str]) -> list[str]:
    """`left` with the keys of a module that is left whole named once, as "module.*"."""
    left_set, out = set(left), []
    for key in left:
        parts = key.split(".")
        name = key
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if all(k in left_set for k in keys if k.startswith(prefix)):
                name = prefix + "*"
                break
        if name not in out:
            out.append(name)
    return out


def load_image_pretrained(
    model: ViViT,
    source: Source,
    tubelet_init: str = "central_frame",
    *,
    temporal_attn_init: str = "copy",
    temporal_encoder_init: str = "random",
    image_grid: tuple[int, int] | None = None,
) -> LoadReport:
    """Initialise `model` from a pretrained image ViT (ViViT section 3.4), in place.

    Args:
        model: any ViViT variant.
        source: a timm `VisionTransformer` or Hugging Face `ViTModel` / `ViTForImageClassification`
            state dict, or a `.safetensors` / `.pth` / `.bin` file holding one.
        tubelet_init: "central_frame" or "inflate" (how a 2D patch filter becomes a tubelet filter).
        temporal_attn_init: model 3: "copy" the spatial MSA's qkv and LayerNorm into the temporal
            MSA, or "random"; the temporal output projection is zeroed either way.
        temporal_encoder_init: model 2: "random", or "image" (the image model's first L_t blocks).
        image_grid: the image model's patch grid (gh, gw) when it is not square.

    Returns:
        A LoadReport: loaded / adapted / skipped / missing keys. A warning names every parameter
        left at its initialisation.

    Raises:
        ValueError for a video model's checkpoint (use `load_video_pretrained`), or a tensor
        that cannot be adapted (naming the key and both shapes).
    """
    if not isinstance(model, ViViT):
        raise TypeError(f"load_image_pretrained: model must be a ViViT, got {type(model).__name__}")
    check_inits("load_image_pretrained", tubelet_init, temporal_attn_init, temporal_encoder_init)  # before reading
    image = read_state_dict(source)
    patch = image.get("patch_embed.proj.weight", image.get("vivit.embeddings.patch_embeddings.projection.weight"))
    if _is_hf_vivit(image) or (patch is not None and patch.dim() == 5):
        raise ValueError(
            "load_image_pretrained: the checkpoint is a video model (its patch filter is "
            f"{tuple(patch.shape) if patch is not None else '3-D'}): load it with load_video_pretrained"
        )
    image, dropped = _timm_layout(image)
    state, report = image_to_video(
        image,
        model.state_dict(),
        model.config,
        tubelet_init=tubelet_init,
        temporal_attn_init=temporal_attn_init,
        temporal_encoder_init=temporal_encoder_init,
        image_grid=image_grid,
    )
    report.skipped.update(dropped)
    model.load_state_dict(state, strict=False)
    _warn_left_at_init("load_image_pretrained", model, state)
    return report


# Fields that do not change the weights: a checkpoint loads into a model that differs only here.
_NOT_WEIGHTS = (*EXECUTION_FIELDS, *TRAINING_ONLY_FIELDS, "num_classes")


def load_hf_vivit(model: ViViT, source: Source, config: Mapping[str, Any] | Any | None = None) -> LoadReport:
    """Load a Hugging Face `VivitForVideoClassification` checkpoint (the layout of
    google/vivit-b-16x2-kinetics400) into a spatio-temporal ViViT (model 1), in place.

    The model must be the checkpoint's model: build it with `vivit_config_from_hf` from the
    checkpoint's config, which is read from a save_pretrained directory's config.json or passed
    as `config` (a `VivitConfig` or config.json dict). Given a config, every field that shapes
    the weights or the function (grid, frames, tubelet, sizes, activation, LayerNorm eps) is
    compared with the model's, and a difference is refused naming the fields; without one,
    only the tensor shapes are checked and the model's own activation is taken as the
    checkpoint's. The classifier loads when its class count matches, else it is skipped and
    reported. The model's config is never changed.

    Raises:
        ValueError for another variant, a config that differs, a missing weight, or a shape
        that does not match (naming the key and both shapes).
    """
    if not isinstance(model, ViViT):
        raise TypeError(f"load_hf_vivit: model must be a ViViT, got {type(model).__name__}")
    c = model.config
    if c.variant != "spatio_temporal" or not c.has_cls_token or c.tokeniser != "tubelet":
        raise ValueError(
            "load_hf_vivit: HF ViViT is model 1 with a CLS token and tubelet embedding; got "
            f"variant={c.variant!r}, pooling={c.pooling!r}, tokeniser={c.tokeniser!r}"
        )
    if config is None and isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        config = _read_hf_config(os.fspath(source))
    if config is not None:
        differences = config_differences(vivit_config_from_hf(config), c, ignore=_NOT_WEIGHTS)
        if differences:
            raise ValueError(
                f"load_hf_vivit: the checkpoint's config differs from the model's: "
                f"{format_differences(differences)} (checkpoint vs model)"
            )
    checkpoint = read_state_dict(source)
    if not is_hf_layout(checkpoint):
        raise ValueError(
            "load_hf_vivit: not a Hugging Face ViViT checkpoint (no 'vivit.embeddings.patch_embeddings.*')"
        )
    converted, dropped = hf_to_timm(checkpoint)
    report = LoadReport(skipped=dict(dropped))
    state: dict[str, torch.Tensor] = {}
    absent = []
    for key, want in model.state_dict().items():
        if key not in converted:
            (report.missing if key.startswith("head.") else absent).append(key)
            continue
        tensor = converted.pop(key)
        if key.startswith("head.") and tensor.shape != want.shape:
            report.skipped[key] = f"class count differs: checkpoint {tuple(tensor.shape)}, model {tuple(want.shape)}"
            continue
        if tensor.shape != want.shape:
            raise shape_error(key, tensor, want)
        state[key] = tensor.to(want.dtype)
        report.loaded.append(key)
    if absent:
        raise ValueError(f"load_hf_vivit: the checkpoint lacks {len(absent)} model weight(s): {absent[:6]}")
    for key in converted:
        report.skipped[key] = "not in the model (the checkpoint is deeper?)"
    model.load_state_dict(state, strict=False)
    _warn_left_at_init("load_hf_vivit", model, state)
    return report


def load_video_pretrained(model: ViViT, source: Source, source_config: ViViTConfig | None = None) -> LoadReport:
    """Initialise `model` from a video ViViT's weights to fine-tune it (on other data, clips or classes), in place.

    Args:
        model: any ViViT variant.
        source: a Hugging Face ViViT save_pretrained directory, a `vivit-train` checkpoint, or
            (with `source_config`) a state dict or file of such a model.
        source_config: the checkpoint model's config; read from `source` when not given.

    The checkpoint's model must have the model's architecture (variant, sizes, tubelet,
    activation, ...); only the input and the class count may differ. The same token grid loads
    as it is; another frame count or frame size resamples the positional embeddings over time
    and space as a video; another class count leaves the model's new head (reported, warned).

    Raises:
        ValueError naming the fields that differ, or for a checkpoint that is not a video model.
    """
    if not isinstance(model, ViViT):
        raise TypeError(f"load_video_pretrained: model must be a ViViT, got {type(model).__name__}")
    if source_config is None:
        state, source_config = read_pretrained(source)
        if source_config is None:
            raise ValueError(
                "load_video_pretrained: not a video model (neither a Hugging Face ViViT directory nor "
                "a vivit-train checkpoint): load an image ViT with load_image_pretrained"
            )
    else:
        state = read_state_dict(source)
    differences = config_differences(source_config, model.config, ignore=(*_NOT_WEIGHTS, "num_frames", "img_size"))
    if differences:
        raise ValueError(
            f"load_video_pretrained: the checkpoint's model differs from this one: "
            f"{format_differences(differences)} (checkpoint vs model)"
        )
    state, dropped = _timm_layout(state)
    weights, report = video_to_video(state, source_config, model.state_dict(), model.config)
    report.skipped.update(dropped)
    model.load_state_dict(weights, strict=False)
    _warn_left_at_init("load_video_pretrained", model, weights)
    return report


def vivit_config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> ViViTConfig:
    """The ViViTConfig (model 1) matching a Hugging Face `VivitConfig` (object or config.json dict)."""
    get = (
        hf_config.get
        if isinstance(hf_config, Mapping)
        else lambda name, default=None: getattr(hf_config, name, default)
    )
    dim = get("hidden_size", 768)
    activation = get("hidden_act", "gelu_fast")
    if activation not in _HF_ACTIVATIONS:
        raise ValueError(f"vivit_config_from_hf: hidden_act {activation!r} is not one of {', '.join(_HF_ACTIVATIONS)}")
    labels = get("num_labels") or len(get("id2label") or {}) or 400
    fields = dict(
        variant="spatio_temporal",
        num_classes=labels,
        img_size=get("image_size", 224),
        num_frames=get("num_frames", 32),
        tubelet=tuple(get("tubelet_size", (2, 16, 16))),
        in_chans=get("num_channels", 3),
        dim=dim,
        depth=get("num_hidden_layers", 12),
        num_heads=get("num_attention_heads", 12),
        mlp_ratio=get("intermediate_size", 4 * dim) / dim,
        pooling="cls",
        mlp_activation=_HF_ACTIVATIONS[activation],
        qkv_bias=get("qkv_bias", True),
        norm_eps=get("layer_norm_eps", 1e-6),
    )
    return ViViTConfig(**{**fields, **overrides})
