"""The reference backend: the naive einsum implementations, on any device and floating dtype."""

import torch

from .. import reference
from .registry import Backend, OpSupport, register

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")

register(
    Backend(
        name="reference",
        auto=False,  # the fallback of "auto", never its first choice
        ops={
            "attention": OpSupport(reference.factorised_attention, _ANY_DEVICE, _FLOATS, dropout=True),
            "tubelet": OpSupport(reference.tubelet_embedding, _ANY_DEVICE, _FLOATS),
        },
    )
)
