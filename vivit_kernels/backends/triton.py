"""The Triton backend: fused attention and tubelet-embedding kernels for CUDA tensors.

CPU tensors run too when the process interprets Triton (TRITON_INTERPRET=1), which is how the
kernels are tested without a GPU; "auto" never picks the interpreter (it is far too slow to be
anyone's default), only `backend="triton"` does. TRITON_INTERPRET is read per call: scripts such
as `python -m vivit_kernels.report` set it after this package is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .registry import Backend, OpSupport, Request, register

_INSTALLED = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Padded to the next power of two (>= 16) with masked lanes; the autotune configs are sized
# (and checked for spills) up to a padded head dim of 128.
_HEAD_DIMS = (16, 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable() -> str | None:
    return None if _INSTALLED else "triton is not installed"


def _extra_reasons(request: Request) -> list[str]:
    if request.device.type == "cpu" and not _interpreting():
        return ["CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)"]
    return []


def _attention(q, k, v, frames, mode, scale):
    from ..triton.attention import attention

    return attention(q, k, v, frames, mode, scale)


def _tubelet(video, weight, bias, pos_embed):
    from ..triton.tubelet import tubelet_embedding

    return tubelet_embedding(video, weight, bias, pos_embed)


def _auto_reasons(request: Request) -> list[str]:
    if _interpreting():
        return ["runs under the Triton interpreter (TRITON_INTERPRET=1): only when named, backend='triton'"]
    return []


register(
    Backend(
        name="triton",
        ops={
            "attention": OpSupport(_attention, ("cuda", "cpu"), _DTYPES, head_dims=_HEAD_DIMS),
            "tubelet": OpSupport(_tubelet, ("cuda", "cpu"), _DTYPES),
        },
        unavailable=_unavailable,
        extra_reasons=_extra_reasons,
        auto_reasons=_auto_reasons,
    )
)
