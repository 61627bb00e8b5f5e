"""Loading weights into a ViViT: from a pretrained image ViT (timm or Hugging Face) or from a
Hugging Face ViViT checkpoint. The tensor surgery lives in `adapt.py`; this file reads files
and applies the result to a model."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from .adapt import LoadReport, hf_to_timm, image_to_video, is_hf_layout, shape_error
from .config import ViViTConfig
from .layers import Mlp
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
    if isinstance(source, Mapping):
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):  # a save_pretrained directory
            names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, n))]
            if not names:
                raise FileNotFoundError(f"{path!r} holds neither model.safetensors nor pytorch_model.bin")
            path = os.path.join(path, names[0])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no checkpoint file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TypeError(f"expected a checkpoint path or a state dict, got {type(source).__name__}")
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
        A LoadReport: loaded / adapted / skipped / missing keys.
    """
    if not isinstance(model, ViViT):
        raise TypeError(f"load_image_pretrained: model must be a ViViT, got {type(model).__name__}")
    image = read_state_dict(source)
    dropped: dict[str, str] = {}
    if is_hf_layout(image):
        image, dropped = hf_to_timm(image)
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
    return report


def load_hf_vivit(model: ViViT, source: Source) -> LoadReport:
    """Load a Hugging Face `VivitForVideoClassification` checkpoint (the layout of
    google/vivit-b-16x2-kinetics400) into a spatio-temporal ViViT (model 1), in place.

    The model must match the checkpoint's sizes (build it with `vivit_config_from_hf`); its
    MLPs are switched to tanh-GELU, the activation HF ViViT uses (`gelu_fast`). The classifier
    loads when its class count matches, else it is skipped and reported.

    Raises:
        ValueError for another variant, a missing weight, or a shape that does not match
        (naming the key and both shapes).
    """
    if not isinstance(model, ViViT):
        raise TypeError(f"load_hf_vivit: model must be a ViViT, got {type(model).__name__}")
    c = model.config
    if c.variant != "spatio_temporal" or not c.has_cls_token or c.tokeniser != "tubelet":
        raise ValueError(
            "load_hf_vivit: HF ViViT is model 1 with a CLS token and tubelet embedding; got "
            f"variant={c.variant!r}, pooling={c.pooling!r}, tokeniser={c.tokeniser!r}"
        )
    checkpoint = read_state_dict(source)
    if not is_hf_layout(checkpoint):
        raise ValueError("load_hf_vivit: not a Hugging Face ViViT checkpoint (no 'vivit.embeddings.patch_embeddings.*')")
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
    for module in model.modules():
        if isinstance(module, Mlp):
            module.act = nn.GELU(approximate="tanh")
    c.mlp_activation = "gelu_tanh"
    report.adapted["mlp.act"] = "tanh-approximated GELU (HF ViViT's gelu_fast)"
    return report


def vivit_config_from_hf(hf_config: Mapping[str, Any] | Any, **overrides) -> ViViTConfig:
    """The ViViTConfig (model 1) matching a Hugging Face `VivitConfig` (object or config.json dict)."""
    get = hf_config.get if isinstance(hf_config, Mapping) else lambda name, default=None: getattr(hf_config, name, default)
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
