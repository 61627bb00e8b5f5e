"""ViViT models built on vivit_kernels: the four variants of the paper, both tokenisers,
initialisation from pretrained image ViTs and import of Hugging Face ViViT checkpoints."""

from .adapt import LoadReport, hf_to_timm, image_to_video, resample_pos_embed, tile_pos_embed
from .config import PRESETS, VARIANTS, ViViTConfig, preset_config
from .model import ViViT, create_model
from .pretrained import load_hf_vivit, load_image_pretrained, read_state_dict, vivit_config_from_hf

__all__ = [
    "PRESETS",
    "VARIANTS",
    "LoadReport",
    "ViViT",
    "ViViTConfig",
    "create_model",
    "hf_to_timm",
    "image_to_video",
    "load_hf_vivit",
    "load_image_pretrained",
    "preset_config",
    "read_state_dict",
    "resample_pos_embed",
    "tile_pos_embed",
    "vivit_config_from_hf",
]
