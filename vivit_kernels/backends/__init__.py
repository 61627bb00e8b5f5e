"""Backend dispatch. Importing a backend's module registers it; "auto" tries them in this order."""

# The import order is the order "auto" tries the backends in: not sorted.
# isort: off
from . import reference  # noqa: F401  (registers "reference", the fallback)
from . import triton  # noqa: F401  (first fused backend "auto" tries)
from . import cpu  # noqa: F401  (the C++ kernels of csrc/: "auto" on CPU tensors)
from . import sdpa  # noqa: F401  (torch SDPA: "auto" where no fused kernel fits)

# isort: on
from .registry import Backend, BackendUnsupportedError, OpSupport, Request, Selected, get, names, register, select

__all__ = [
    "Backend",
    "BackendUnsupportedError",
    "OpSupport",
    "Request",
    "Selected",
    "get",
    "names",
    "register",
    "select",
]
