"""What every Triton kernel launcher here shares: interpreter detection and its workarounds."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl


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


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16, doubling the
    rounding error a GPU makes; under UPCAST (bf16, interpreted) the rounding is done here."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton launches need CUDA tensors, or CPU tensors under the interpreter."""
    device = tensors[0].device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"Triton kernels need CUDA tensors (CPU only with TRITON_INTERPRET=1), got {device}")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel instance to compile ahead of time for a GPU target (see `inspect.py`).

    Every kernel module in this package exposes `compile_specs() -> list[CompileSpec]`, one per
    (autotune config, dtype, static variant), so the inspection compiles what the autotuner may run.
    """

    name: str  # e.g. "attention_fwd[fp16, BLOCK_M=128, BLOCK_N=64, HEAD_DIM=64]"
    fn: Any  # the @triton.jit function (not the autotuner wrapping it)
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments (block sizes, switches)
    num_warps: int = 4
    num_stages: int = 2
    dtype: str = "fp32"  # the input dtype this instance serves: fp32, fp16 or bf16
    autotune_candidate: bool = True  # may the autotuner pick it? (such configs must not spill)
