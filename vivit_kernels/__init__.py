"""Fused factorised attention and tubelet embedding for video transformers (ViViT)."""

from .attention import FactorisedAttention, factorised_attention
from .backends import BackendUnsupportedError
from .memory import saved_bytes
from .tubelet import (
    TubeletEmbedding,
    UniformFrameEmbedding,
    central_frame,
    inflate,
    tubelet_embedding,
    uniform_frame_indices,
)

__all__ = [
    "BackendUnsupportedError",
    "FactorisedAttention",
    "TubeletEmbedding",
    "UniformFrameEmbedding",
    "central_frame",
    "factorised_attention",
    "inflate",
    "saved_bytes",
    "tubelet_embedding",
    "uniform_frame_indices",
]
__version__ = "0.1.0"
