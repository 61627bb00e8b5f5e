"""The `vivit_kernels` operator namespace, and how one op is declared in it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

NAMESPACE = "vivit_kernels"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(name: str, schema: str, launcher: Callable | None, fake: Callable, flops: Callable | None = None):
    """Declare `vivit_kernels::{name}{schema}` with its fake kernel and FLOP formula.

    `launcher` runs the kernel for every device the backend takes (registered as the op's
    CompositeExplicitAutograd kernel); None when a compiled library provides the kernel for its
    device key (csrc/ops.cpp: TORCH_LIBRARY_IMPL), which may be loaded before or after this.
    """
    LIBRARY.define(name + schema)
    if launcher is not None:
        LIBRARY.impl(name, launcher, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    op = getattr(getattr(torch.ops, NAMESPACE), name)
    if flops is not None:
        register_flop_formula(op)(flops)
    return op


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    torch.library.register_autograd(op._qualified_op_name, backward, setup_context=setup_context, lib=LIBRARY)


def _cast(x, device_type: str, dtype: torch.dtype):
    """x cast to `dtype` if autocast would cast it: a floating tensor on `device_type`, not float64."""
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.device.type == device_type
        and x.dtype != torch.float64
    ):
        return x.to(dtype)
    return x


def autocast_inputs(tensors: tuple, device_type: str) -> tuple:
    """`tensors` as autocast hands them to its lower-precision ops (convolution, SDPA) inside an
    autocast region for `device_type`: cast to the region's dtype (float64 and other devices'
    tensors left alone). Unchanged outside such a region."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(_cast(x, device_type, dtype) for x in tensors)


def register_autocast(op, device_type: str, dtype: torch.dtype | None = None) -> None:
    """How `op` runs inside an autocast region for `device_type`: its floating inputs cast to
    `dtype`, or with None to the region's dtype (fp16 or bf16, as autocast does for convolution
    and SDPA), then the op runs with autocast off. torch.library.register_autocast casts to one
    dtype fixed at registration, which would ignore the region's."""
    key = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}[device_type]

    def run(*args):
        target = dtype or torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return op(*(_cast(x, device_type, target) for x in args))

    LIBRARY.impl(op._qualified_op_name.split("::")[1], run, key)
