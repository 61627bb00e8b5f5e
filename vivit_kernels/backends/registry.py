"""The backend registry: who can run which op on which inputs, and why not.

Each backend declares, per op, the devices, dtypes and head dims it takes (one place, read
before dispatch). `backend="auto"` picks the first fused backend with no objection and falls
back to the reference implementation with a warning that lists every objection; asking for
a named backend that cannot take the input raises `BackendUnsupportedError` with its reasons.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

OPS = ("attention", "tubelet")
FALLBACK = "reference"


class BackendUnsupportedError(ValueError):
    """The requested backend (or, with "auto", every backend) cannot run this input."""


@dataclass(frozen=True)
class Request:
    """The facts about one call that decide which backend may run it."""

    op: str  # one of OPS
    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None  # attention only
    dropout_p: float = 0.0  # attention only


@dataclass(frozen=True)
class OpSupport:
    """What a backend can run for one op, and the function that runs it."""

    run: Callable[..., torch.Tensor]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, int] | None = None  # inclusive range; None = any
    dropout: bool = False


@dataclass(frozen=True)
class Backend:
    name: str
    ops: dict[str, OpSupport]
    auto: bool = True  # may "auto" pick it? (the reference backend is the fallback instead)
    # Why the backend cannot run at all on this machine (missing package, failed build), or None.
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    # Reasons beyond the declarative fields (e.g. CPU tensors only under the Triton interpreter).
    extra_reasons: Callable[[Request], list[str]] = field(default=lambda request: [])
    # Reasons "auto" passes the backend over although it would run the input when named
    # (e.g. interpreted Triton: correct, far too slow to be anyone's default).
    auto_reasons: Callable[[Request], list[str]] = field(default=lambda request: [])

    def not_supported_reasons(self, request: Request) -> list[str]:
        support = self.ops.get(request.op)
        if support is None:
            return [f"does not implement {request.op}"]
        # Declared limits first: they are free to check, while `unavailable` may load or build
        # the backend (a CUDA request must never trigger the CPU extension's build).
        reasons = []
        if request.device.type not in support.devices:
            reasons.append(f"device {request.device.type} not supported (supports {', '.join(support.devices)})")
        if request.dtype not in support.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in support.dtypes)
            reasons.append(f"dtype {str(request.dtype).removeprefix('torch.')} not supported (supports {names})")
        if support.head_dims is not None and request.head_dim is not None:
            lo, hi = support.head_dims
            if not lo <= request.head_dim <= hi:
                reasons.append(f"head dim {request.head_dim} not supported (supports {lo} to {hi})")
        if request.dropout_p > 0.0 and not support.dropout:
            reasons.append("attention dropout not supported")
        if reasons:
            return reasons
        reason = self.unavailable()
        return [reason] if reason else self.extra_reasons(request)


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def names() -> list[str]:
    return list(_BACKENDS)


def get(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(map(repr, _BACKENDS))}")
    return _BACKENDS[name]


def _describe(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())


def select(request: Request, backend: str = "auto") -> OpSupport:
    """The op implementation that runs `request` on `backend` ("auto" or a registered name)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        chosen = get(backend)
        reasons = chosen.not_supported_reasons(request)
        if reasons:
            raise BackendUnsupportedError(f"{request.op}: backend {backend!r} cannot run this input: {', '.join(reasons)}")
        return chosen.ops[request.op]

    refused: dict[str, list[str]] = {}
    for candidate in _BACKENDS.values():
        if not candidate.auto:
            continue
        reasons = candidate.not_supported_reasons(request) or candidate.auto_reasons(request)
        if not reasons:
            return candidate.ops[request.op]
        refused[candidate.name] = reasons
    fallback = _BACKENDS[FALLBACK]
    reasons = fallback.not_supported_reasons(request)
    if reasons:
        refused[FALLBACK] = reasons
        raise BackendUnsupportedError(f"{request.op}: no backend can run this input ({_describe(refused)})")
    if refused:
        warnings.warn(
            f"{request.op}: no fused backend fits, using the reference implementation ({_describe(refused)})",
            stacklevel=3,
        )
    return fallback.ops[request.op]
