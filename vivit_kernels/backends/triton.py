"""The Triton backend: fused attention and tubelet-embedding kernels for CUDA tensors.

CPU tensors run too when the process interprets Triton (TRITON_INTERPRET=1), which is how the
kernels are tested without a GPU; "auto" never picks the interpreter (it is far too slow to be
anyone's default), only `backend="triton"` does. Triton reads TRITON_INTERPRET when a kernel
module is imported, so it is read once here too.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .registry import Backend, OpSupport, Request, register

_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Padded to the next power of two (>= 16) with masked lanes; 128 is the largest tile that the
# autotune configs keep free of register spills.
_HEAD_DIMS = (16, 128)


def _unavailable() -> str | None:
    return None if _INSTALLED else "triton is not installed"


def _extra_reasons(request: Request) -> list[str]:
    if request.device.type == "cpu" and not _INTERPRETING:
        return ["CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"]
    return []


def _attention(q, k, v, frames, mode, scale):
    from ..triton.attention import attention

    return attention(q, k, v, frames, mode, scale)


def _tubelet(video, weight, bias, pos_embed):
    from ..triton.tubelet import tubelet_embedding

    return tubelet_embedding(video, weight, bias, pos_embed)


register(
    Backend(
        name="triton",
        ops={
            "attention": OpSupport(_attention, ("cuda", "cpu"), _DTYPES, head_dims=_HEAD_DIMS),
            "tubelet": OpSupport(_tubelet, ("cuda", "cpu"), _DTYPES),
        },
        auto=not _INTERPRETING,
        unavailable=_unavailable,
        extra_reasons=_extra_reasons,
    )
)
