"""ViViT models built on vivit_kernels: the four variants of the paper, both tokenisers,
initialisation from pretrained image ViTs and import of Hugging Face ViViT checkpoints."""

from .adapt import (
    LoadReport,
    central_frame,
    hf_to_timm,
    image_to_video,
    inflate,
    resample_pos_embed,
    resample_video_pos_embed,
    tile_pos_embed,
)
from .config import BLOCK_MEMORY, PRESETS, VARIANTS, ViViTConfig, preset_config
from .layers import BlockConfig
from .model import ViViT, build_model, create_model, model_spec
from .pretrained import (
    load_hf_vivit,
    load_image_pretrained,
    load_video_pretrained,
    read_state_dict,
    vivit_config_from_hf,
)

__all__ = [
    "BLOCK_MEMORY",
    "PRESETS",
    "VARIANTS",
    "BlockConfig",
    "LoadReport",
    "MemoryPlan",
    "ViViT",
    "ViViTConfig",
    "build_model",
    "central_frame",
    "create_model",
    "hf_to_timm",
    "image_to_video",
    "inflate",
    "load_hf_vivit",
    "load_image_pretrained",
    "load_video_pretrained",
    "model_spec",
    "parse_bytes",
    "plan_memory",
    "preset_config",
    "read_state_dict",
    "resample_pos_embed",
    "resample_video_pos_embed",
    "tile_pos_embed",
    "vivit_config_from_hf",
]

_PLANNING = ("MemoryPlan", "parse_bytes", "plan_memory")


def __getattr__(name: str):
    # Imported on first use, so that `python -m vivit.planning` does not find the module already
    # imported by its own package (runpy warns then).
    if name in _PLANNING:
        from . import planning

        return getattr(planning, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
