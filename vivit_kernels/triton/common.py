"""What every Triton kernel module here shares: compiled-or-interpreted, and the interpreter's workarounds."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import interpreted


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The autotuner's candidates: the GPU list, or one config under the interpreter, which
    would otherwise run every config (slowly) and time nothing meaningful."""
    return [interpreter_config] if interpreted() else gpu_configs


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` made the current CUDA device, and so its current stream the one used: a Triton
    launch runs on the current device's current stream, not on its tensors' device (tensors on
    cuda:1 under current device 0 fail or race). Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_input_device(launcher: Callable) -> Callable:
    """Decorator for a launcher: run it under `device_guard` of its first argument's device (the
    ops' checks put every tensor of a call on one device)."""

    @functools.wraps(launcher)
    def launch(first: torch.Tensor, *args, **kwargs):
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)

    return launch


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """Whether to feed tl.dot fp32 operands: only for bf16 under the interpreter, whose bf16
    dot is wrong (triton-lang/triton#11584). Loads, conversions and stores stay bf16, and the
    real bf16 dot is checked by compiling for sm_80/sm_90 (see `inspect.py`)."""
    return dtype == torch.bfloat16 and interpreted()


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter truncates fp32 -> bf16, doubling the
    rounding error a GPU makes; under UPCAST (bf16, interpreted) the rounding is done here."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# The architecture the inspection compiles for while it records launches (see inspect.py); None
# in a real process, where the tensors' device tells.
inspected_arch: int | None = None


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def target_arch(tensor: torch.Tensor) -> int:
    """The compute capability a launch on `tensor` compiles for, as 80, 86, 89, 90, ..."""
    if inspected_arch is not None:
        return inspected_arch
    return _capability(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
