"""The `vivit_kernels` operator namespace, and how one op is declared in it."""

from __future__ import annotations

from typing import Callable

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
