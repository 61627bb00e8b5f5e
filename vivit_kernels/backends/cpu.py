"""The "cpu" backend: the C++ kernels of csrc/, registered for CPU tensors when the library loads.

The ops (`vivit_kernels::cpu_*`) are declared by the ops layer like every backend's; csrc/ops.cpp
registers their CPU kernels. The library is loaded, or built, the first time the registry asks
whether this backend is available; when it cannot be, the backend says why and "auto" falls back
to the reference backend with a warning.
"""

from __future__ import annotations

import torch

from .. import _extension
from ..ops import define_attention_ops, define_tubelet_ops
from .registry import Backend, OpSupport, register

# The kernels take fp32 and fp64 only, so inside a CPU autocast region the ops run in fp32
# (autocast's rule for ops without a low-precision kernel): bf16 activations are accepted and
# fp64 stays fp64. `factorised_attention` / `tubelet_embedding` cast to the region's dtype before
# choosing a backend, so "auto" reaches these ops under autocast only with fp64 inputs.
_AUTOCAST = {"cpu": torch.float32}
# The attention ops' autograd is C++ too (csrc/autograd.cpp): a Python autograd.Function around
# every layer's call would cost more than a small layer's kernels.
ATTENTION = define_attention_ops("cpu", autocast=_AUTOCAST, autograd=False)
TUBELET = define_tubelet_ops("cpu", autocast=_AUTOCAST)

_DTYPES = (torch.float32, torch.float64)
# Any head dim runs; per-thread scratch grows as 256 x Dh, hence a bound.
_HEAD_DIMS = (1, 1024)


def load() -> None:
    """Load (or build) the C++ library, registering the ops' CPU kernels. Raises RuntimeError saying why not."""
    _extension.load()


# Run as it is, not traced, under torch.compile: loading a library (a filesystem stat, a dlopen)
# is not something a graph can hold, and whether it loaded is a constant of the process.
@torch.compiler.assume_constant_result
def _unavailable() -> str | None:
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


register(
    Backend(
        name="cpu",
        ops={
            "attention": OpSupport(ATTENTION, ("cpu",), _DTYPES, head_dims=_HEAD_DIMS),
            "attention_packed": OpSupport(ATTENTION.packed, ("cpu",), _DTYPES, head_dims=_HEAD_DIMS),
            "tubelet": OpSupport(TUBELET, ("cpu",), _DTYPES),
        },
        unavailable=_unavailable,
    )
)
