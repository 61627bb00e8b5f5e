"""What every benchmark shares: the Case, targets, passes, baseline names, the training step, the
child-process probe's client and the error measure. It imports no other module of benchmarks/.

A case is a JSON-able spec and a builder that turns it into inputs and a call. The spec names the
op, the implementation ("backend": a registry name, or a baseline its family defines, such as
"plain_einsum", "plain_sdpa", "conv3d", "unfold_matmul"), the pass, the device/dtype target and
the shape. The builders live in one module per family (attention, tubelet, training, loader,
dropin, memory) and benchmarks/registry.py assembles them; the same builder serves the timed test
and the child process that measures CPU peak memory (benchmarks/probe.py), so both run exactly
the same call.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import vivit_kernels
from vivit_kernels import backends
from vivit_kernels.checks import AttentionShape

REPO = Path(__file__).resolve().parent.parent

FORWARD, BACKWARD = "forward", "forward+backward"
PASSES = (FORWARD, BACKWARD)
TRAIN_STEP = "train step"
BASELINE = "reference"  # the library's naive einsum backend: the einsum baseline of every op but attention
# Attention is measured against the plain code a user would write instead (attention.plain_attention):
# the library's "reference" and "sdpa" backends carry its general paths (prefix tokens, layouts,
# dropout), so they are rows timed against that plain code, not what speedups divide.
PLAIN_EINSUM, PLAIN_SDPA = "plain_einsum", "plain_sdpa"
UNFUSED_ATTENTION = (BASELINE, "sdpa")  # the library's backends that are timed as rows, not as baselines


def einsum_baseline(op: str) -> str:
    """The einsum implementation an op's speedups ("vs einsum") are relative to."""
    return PLAIN_EINSUM if op == "attention" else BASELINE


# The torch implementation a user would otherwise call: speedups against it are reported too.
# For a converted model (op "dropin") it is the model as its library built it.
TORCH_BASELINES = {"attention": PLAIN_SDPA, "tubelet": "conv3d", "dropin": "original"}

# Device/dtype targets: fp32 on the CPU; fp16 and bf16 on CUDA GPUs.
TARGETS = ("cpu-float32", "cuda-float16", "cuda-bfloat16")

# CPU limits of the timed run (2 cores, ~150 GFLOP/s fp32, shared memory): larger cases are
# skipped on the CPU with the reason, and run on GPUs.
CPU_MAX_FORWARD_FLOPS = 50e9
CPU_MAX_SCORE_BYTES = 2 * 2**30


def parse_target(target: str) -> tuple[torch.device, torch.dtype]:
    device, dtype = target.split("-")
    return torch.device(device), getattr(torch, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (0 where both are zero)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def check_matches(subject: str, reference: str, pairs, tolerance: float) -> None:
    """AssertionError for the first (what, expected, actual) of `pairs` whose relative error is over
    `tolerance`: "{subject} {what} differ from {reference} by ...". A case checked before timing."""
    for what, expected, actual in pairs:
        error = relative_error(actual, expected)
        if not error <= tolerance:
            raise AssertionError(f"{subject} {what} differ from {reference} by {error:.2e} relative (> {tolerance:g})")


@dataclass
class Case:
    """One benchmarked call. `setup` (untimed) resets state; `run` does one pass, synchronised on CUDA."""

    setup: Callable[[], None]
    run: Callable[[], None]
    # Bytes autograd saves for backward in this call (measured with inputs that require grad).
    saved_bytes: Callable[[], int]
    flops: float | None  # from the stated formula; None where counted while warming up
    flop_formula: str
    device: torch.device
    info: dict = field(default_factory=dict)


def synchronised(fn: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """`fn` followed by a device synchronisation. Around a timed call (after its setup, and after
    the call itself) this makes the timer cover exactly that call's kernels."""
    if device.type != "cuda":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize(device)

    return run


def registry_skip_reason(op: str, backend: str, device: torch.device, dtype: torch.dtype, shape) -> str | None:
    """Why a registered backend is not benchmarked on this input: it cannot run it, or "auto"
    passes it over although it runs when named (the Triton interpreter: never timed)."""
    chosen = backends.get(backend)
    request = backends.Request(op, device, dtype, shape)
    reasons = chosen.not_supported_reasons(request) or (chosen.auto_reasons(request) if chosen.auto else [])
    return f"backend {backend!r}: {', '.join(reasons)}" if reasons else None


# ------------------------------------------------------------------------------- training step


def training_skip_reason(spec: dict) -> str | None:
    """Why a ViViT training step with the spec's backend cannot run ("auto" with nothing fused), or None."""
    device, dtype = parse_target(spec["target"])
    if spec["backend"] == "auto":
        # "auto" may fall back to the reference: then there is no fused step to compare.
        request = backends.Request("attention", device, dtype, AttentionShape.of((1, 2, 4 * 16, 64), 4, "split"))
        with warnings.catch_warnings(record=True) as fallback:
            warnings.simplefilter("always")
            chosen = backends.select(request, "auto").name
        if chosen == BASELINE:
            detail = str(fallback[0].message) if fallback else "no fused backend is registered"
            return f"no fused attention backend for {device.type} {dtype_name(dtype)} ({detail})"
    return None


def train_step_case(
    model: torch.nn.Module,
    logits: Callable[[], torch.Tensor],
    labels: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    optimizer: torch.optim.Optimizer | None = None,
) -> Case:
    """One training step of `model` (on `device`): cross-entropy of `logits()` against `labels`, its
    backward and an update by `optimizer` (default: a new AdamW); zero_grad runs untimed before it."""
    model.train()
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-4)
    # fp32 on the CPU; on GPUs the usual mixed precision (autocast to the target dtype).
    autocast = device.type == "cuda" and dtype != torch.float32

    def loss() -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return F.cross_entropy(logits(), labels)

    def run() -> None:
        loss().backward()
        optimizer.step()

    def setup() -> None:
        # Outside the timed call, so that peak memory counts the step's gradients.
        optimizer.zero_grad(set_to_none=True)

    return Case(
        setup=synchronised(setup, device),
        run=synchronised(run, device),
        saved_bytes=lambda: vivit_kernels.saved_bytes(loss),
        flops=None,
        flop_formula="torch.utils.flop_counter.FlopCounterMode over one step (forward+backward)",
        device=device,
        info={"parameters": sum(p.numel() for p in model.parameters())},
    )


# -------------------------------------------------------------------------- CPU peak memory


def status_kib(field_name: str) -> int:
    """A "kB" field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def cpu_peak_in_process(case: Case, footprint_kib: int | None = None) -> int | None:
    """Peak resident bytes one (already warm) call adds to this process (or, given `footprint_kib`,
    the peak above that footprint), or None without clear_refs."""
    case.setup()
    gc.collect()
    before = status_kib("VmRSS") if footprint_kib is None else footprint_kib
    try:
        # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    case.run()
    return max(0, status_kib("VmHWM") - before) * 1024


class _ProbeServer:
    """A small process (`python -m benchmarks.probe --serve`) that imports torch and the cases
    once, then forks a fresh child per measurement.

    Each child starts from the server's small footprint (no tensors, no thread pool, CUDA not
    initialised, so a child may use it), builds and warms its case, and reports what
    benchmarks/probe.py measures; the fork saves the ~1.5 s import per case.
    """

    def __init__(self) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        # A fixed mmap threshold: freed tensors go back to the kernel instead of hiding in the heap.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=pythonpath)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.probe", "--serve"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        atexit.register(self.close)

    def measure(self, spec: dict) -> dict:
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peak-memory server exited (status {self.process.poll()}) measuring {spec}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peak-memory child failed for {spec}:\n{reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


_server: _ProbeServer | None = None


def probe_in_child(spec: dict) -> dict:
    """What benchmarks/probe.py measures of `spec`, in a fresh child process: for a case
    {"peak_bytes", "saved_bytes"}, for a budget search (spec["peak"] = "budget") its result.

    peak_bytes: `cpu_peak_in_process` (None for CUDA targets, measured in the parent instead).
    saved_bytes: `vivit_kernels.saved_bytes` of the case. It runs there, not in the parent,
    because its pack hook returns each saved tensor itself: a saved output then references its
    own grad_fn through C++, a cycle Python's collector cannot see, and every measured graph
    (inputs, activations, a whole model's parameters) would stay alive for the session.
    """
    global _server
    if _server is None or _server.process.poll() is not None:
        _server = _ProbeServer()
    return _server.measure(spec)
