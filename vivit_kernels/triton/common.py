"""What every Triton kernel launcher here shares: interpreter detection and its workarounds."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """Kernels run under Triton's interpreter (on CPU tensors), not compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The autotuner's candidates: the GPU list, or one config under the interpreter, which
    would otherwise run every config (slowly) and time nothing meaningful."""
    return [interpreter_config] if interpreting() else gpu_configs


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether to feed tl.dot fp32 operands: only for bf16 under the interpreter, whose bf16
    dot is wrong (triton-lang/triton#11584). Loads, conversions and stores stay bf16, and the
    real bf16 dot is checked by compiling for sm_80/sm_90 (see `inspect.py`)."""
    return dtype == torch.bfloat16 and interpreting()


def check_device(*tensors: torch.Tensor) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under the interpreter."""
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors (CPU only with TRITON_INTERPRET=1), got {device}")
