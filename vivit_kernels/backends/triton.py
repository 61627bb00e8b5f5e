"""The Triton backend: fused attention and tubelet-embedding kernels for CUDA tensors.

CPU tensors run too when this process interprets the kernels (`vivit_kernels.triton.interpreted()`:
no CUDA device, or TRITON_INTERPRET=1), which is how they are tested without a GPU; "auto" never
picks the interpreter (it is far too slow to be anyone's default), only `backend="triton"` does.
The kernel modules, which need triton, are imported when a kernel first runs.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from ..ops import define_attention_ops, define_tubelet_ops
from ..triton import INT32_MAX, interpreted, unusable
from .registry import Backend, OpSupport, Request, register

_INSTALLED = importlib.util.find_spec("triton") is not None
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEVICES = ("cuda", "cpu")
# Padded to the next power of two (>= 16) with masked lanes; the autotune configs are sized
# (and checked for spills) up to a padded head dim of 128.
_HEAD_DIMS = (16, 128)


def _launcher(module: str, name: str):
    """`vivit_kernels.triton.<module>.<name>`, imported at its first call: triton is imported only
    when a kernel runs."""

    def launch(*args):
        return getattr(importlib.import_module(f"vivit_kernels.triton.{module}"), name)(*args)

    return launch


# Under autocast the ops follow torch's policy for SDPA and convolution: inputs cast to the region's
# dtype (CPU too, where the kernels run interpreted).
_AUTOCAST = {"cuda": None, "cpu": None}
ATTENTION = define_attention_ops(
    "triton",
    *(_launcher("attention", name) for name in ("forward", "backward", "packed_forward", "packed_backward")),
    autocast=_AUTOCAST,
)
TUBELET = define_tubelet_ops(
    "triton",
    *(_launcher("tubelet", name) for name in ("forward", "backward_video", "backward_weight", "backward_pos")),
    autocast=_AUTOCAST,
)


def _unavailable() -> str | None:
    return unusable() if _INSTALLED else "triton is not installed"


def _extra_reasons(request: Request) -> list[str]:
    if request.device.type == "cpu" and not interpreted():
        return ["CPU tensors run only under the Triton interpreter (no CUDA device, or TRITON_INTERPRET=1)"]
    return []


def _auto_reasons(request: Request) -> list[str]:
    if interpreted():
        return ["the kernels run under the Triton interpreter here: only when named, backend='triton'"]
    return []


register(
    Backend(
        name="triton",
        ops={
            "attention": OpSupport(ATTENTION, _DEVICES, _DTYPES, head_dims=_HEAD_DIMS),
            "attention_packed": OpSupport(ATTENTION.packed, _DEVICES, _DTYPES, head_dims=_HEAD_DIMS),
            "tubelet": OpSupport(TUBELET, _DEVICES, _DTYPES, max_index=INT32_MAX),
        },
        unavailable=_unavailable,
        extra_reasons=_extra_reasons,
        auto_reasons=_auto_reasons,
    )
)
