"""The backend registry: who can run which op on which inputs, and why not.

Each backend declares, per op, its limits: devices, dtypes, head dims, attention dropout, the
index range of its kernels, and reasons that depend on the machine (a missing package, a failed
build) or on the call (CPU tensors only under the Triton interpreter). A `Request` carries the
call's device, dtype and checked shape; every limit is a reason read from it before anything
runs. `backend="auto"` picks the first fused backend with no reason against it; when none fits it
falls back, with a warning that lists every reason, to the first unfused backend that fits:
torch SDPA for attention, the reference implementation for the tubelet embedding (which SDPA
does not implement) or an input SDPA cannot take. A named backend that cannot take the input
raises `BackendUnsupportedError` with its reasons. Whatever is picked runs with one signature:
`run(*tensors, shape)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checks import AttentionShape, TubeletShape, check_choice

OPS = ("attention", "attention_packed", "tubelet")
FALLBACK = "reference"


class BackendUnsupportedError(ValueError):
    """The requested backend (or, with "auto", every backend) cannot run this input."""


@dataclass(frozen=True)
class Request:
    """The facts about one call that decide which backend may run it."""

    op: str  # one of OPS
    device: torch.device
    dtype: torch.dtype
    shape: AttentionShape | TubeletShape


@dataclass(frozen=True)
class OpSupport:
    """What a backend can run for one op, and the callable that runs it: `run(*tensors, shape)`."""

    run: Callable[..., torch.Tensor]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, int] | None = None  # attention: inclusive range; None = any
    dropout: bool = False  # attention: dropout on the probabilities
    max_index: int | None = None  # largest element offset the kernels' index maps can hold (shape.index_spans)

    def reasons(self, request: Request) -> list[str]:
        """Why these declared limits exclude the request (empty when they do not)."""
        reasons = []
        if request.device.type not in self.devices:
            reasons.append(f"device {request.device.type} not supported (supports {', '.join(self.devices)})")
        if request.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(request.dtype).removeprefix('torch.')} not supported (supports {names})")
        shape = request.shape
        if self.head_dims is not None and isinstance(shape, AttentionShape):
            lo, hi = self.head_dims
            if not lo <= shape.head_dim <= hi:
                reasons.append(f"head dim {shape.head_dim} not supported (supports {lo} to {hi})")
        if isinstance(shape, AttentionShape) and shape.dropout_p > 0.0 and not self.dropout:
            reasons.append("attention dropout not supported")
        if self.max_index is not None and isinstance(shape, TubeletShape):
            for what, elements in shape.index_spans.items():
                if elements > self.max_index + 1:
                    reasons.append(f"{what} spans {elements} elements (supports at most {self.max_index + 1})")
        return reasons


def _no_reasons(request: Request) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    name: str
    ops: dict[str, OpSupport]
    auto: bool = True  # may "auto" pick it? (the reference backend is the last resort instead)
    fused: bool = True  # a fused kernel; "auto" warns when it picks one that is not
    # Why the backend cannot run at all on this machine (missing package, failed build), or None.
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    # Reasons beyond the declared fields (e.g. CPU tensors only under the Triton interpreter).
    extra_reasons: Callable[[Request], list[str]] = _no_reasons
    # Reasons "auto" passes the backend over although it runs the input when named (e.g.
    # interpreted Triton: correct, far too slow to be anyone's default). Such a backend is
    # never timed by the benchmarks either.
    auto_reasons: Callable[[Request], list[str]] = _no_reasons

    def not_supported_reasons(self, request: Request) -> list[str]:
        support = self.ops.get(request.op)
        if support is None:
            return [f"does not implement {request.op}"]
        # Declared limits first: they are free to check, while `unavailable` may load or build
        # the backend (a CUDA request must never trigger the CPU extension's build).
        reasons = support.reasons(request)
        if reasons:
            return reasons
        reason = self.unavailable()
        return [reason] if reason else self.extra_reasons(request)


@dataclass(frozen=True)
class Selected:
    """The backend chosen for a request: its name and the op implementation to call."""

    name: str
    run: Callable[..., torch.Tensor]


_BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def names() -> list[str]:
    return list(_BACKENDS)


def get(name: str) -> Backend:
    check_choice("backends.get", "name", name, tuple(_BACKENDS))
    return _BACKENDS[name]


def _describe(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {', '.join(why)}" for name, why in reasons.items())


def select(request: Request, backend: str = "auto") -> Selected:
    """The backend that runs `request` on `backend` ("auto" or a registered name)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    check_choice(request.op, "backend", backend, ("auto", *_BACKENDS))
    if backend != "auto":
        chosen = get(backend)
        reasons = chosen.not_supported_reasons(request)
        if reasons:
            raise BackendUnsupportedError(
                f"{request.op}: backend {backend!r} cannot run this input: {', '.join(reasons)}"
            )
        return Selected(backend, chosen.ops[request.op].run)

    refused: dict[str, list[str]] = {}
    for candidate in [*(b for b in _BACKENDS.values() if b.auto), _BACKENDS[FALLBACK]]:
        reasons = candidate.not_supported_reasons(request) or (
            candidate.auto_reasons(request) if candidate.auto else []
        )
        if reasons:
            refused[candidate.name] = reasons
            continue
        if not candidate.fused and refused:
            what = "torch SDPA" if candidate.name == "sdpa" else f"the {candidate.name} implementation"
            warnings.warn(f"{request.op}: no fused backend fits, using {what} ({_describe(refused)})", stacklevel=4)
        return Selected(candidate.name, candidate.ops[request.op].run)
    raise BackendUnsupportedError(f"{request.op}: no backend can run this input ({_describe(refused)})")
