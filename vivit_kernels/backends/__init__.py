"""Backend dispatch. Importing a backend's module registers it; "auto" tries them in this order."""

from . import reference  # noqa: F401  (registers "reference", the fallback)
from .registry import Backend, BackendUnsupportedError, OpSupport, Request, get, names, register, select

__all__ = ["Backend", "BackendUnsupportedError", "OpSupport", "Request", "get", "names", "register", "select"]
