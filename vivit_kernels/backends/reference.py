"""The reference backend: the naive einsum implementations, on any device and floating dtype."""

import functools

import torch

from .. import reference
from ..checks import AttentionShape, TubeletShape
from .registry import Backend, OpSupport, register

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return reference.factorised_attention(
        q, k, v, shape.frames, shape.mode, shape.scale, shape.dropout_p, shape.prefix, shape.layout
    )


def attention_packed(qkv: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    attend = functools.partial(reference.attend, scale=shape.scale, dropout_p=shape.dropout_p)
    return reference.grouped_attention_packed(qkv, shape, attend, contiguous=True)


def tubelet_embedding(video, weight, bias, pos_embed, shape: TubeletShape) -> torch.Tensor:
    return reference.tubelet_embedding(video, weight, bias, pos_embed)


register(
    Backend(
        name="reference",
        auto=False,  # "auto"'s last resort, never its choice: the tests' oracle
        fused=False,
        ops={
            "attention": OpSupport(attention, _ANY_DEVICE, _FLOATS, dropout=True),
            "attention_packed": OpSupport(attention_packed, _ANY_DEVICE, _FLOATS, dropout=True),
            "tubelet": OpSupport(tubelet_embedding, _ANY_DEVICE, _FLOATS),
        },
    )
)
