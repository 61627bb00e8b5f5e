"""Fused factorised attention and tubelet embedding for video transformers (ViViT)."""

# First: it decides whether triton runs interpreted (no CUDA device) before anything imports triton.
from . import triton as _triton  # noqa: F401  # isort: skip
from .attention import FactorisedAttention, attention_backend, factorised_attention, factorised_attention_packed
from .backends import BackendUnsupportedError
from .convert import convert
from .lean import gelu_linear, norm_linear, stacked_linear
from .memory import saved_bytes
from .tubelet import TubeletEmbedding, UniformFrameEmbedding, tubelet_backend, tubelet_embedding, uniform_frame_indices

__all__ = [
    "BackendUnsupportedError",
    "FactorisedAttention",
    "TubeletEmbedding",
    "UniformFrameEmbedding",
    "attention_backend",
    "convert",
    "factorised_attention",
    "factorised_attention_packed",
    "gelu_linear",
    "norm_linear",
    "stacked_linear",
    "saved_bytes",
    "tubelet_backend",
    "tubelet_embedding",
    "uniform_frame_indices",
]
__version__ = "0.1.0"
