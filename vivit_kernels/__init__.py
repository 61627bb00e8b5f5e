"""Fused factorised attention and tubelet embedding for video transformers (ViViT)."""

from .attention import FactorisedAttention, factorised_attention
from .backends import BackendUnsupportedError
from .memory import saved_bytes
from .tubelet import TubeletEmbedding, tubelet_embedding

__all__ = [
    "BackendUnsupportedError",
    "FactorisedAttention",
    "TubeletEmbedding",
    "factorised_attention",
    "saved_bytes",
    "tubelet_embedding",
]
__version__ = "0.1.0"
