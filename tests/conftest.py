"""Helpers shared by the tests: input builders, an error measure and the float64 oracle.

Without a GPU the Triton kernels run under Triton's interpreter, on CPU tensors: the library
decides that itself (`vivit_kernels.triton.interpreted`), so nothing here configures it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vivit_kernels import factorised_attention, factorised_attention_packed, tubelet_embedding
from vivit_kernels.checks import MODES
from vivit_kernels.ops.attention import split_heads, unpack_qkv

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # benchmarks/ is a package of the repository, not of the installed project
    sys.path.insert(0, str(REPO))

# The benchmarks' correctness checks measure errors the same way (one definition, re-exported here).
from benchmarks.core import relative_error  # noqa: E402


def oracle_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """relative_error, or max |actual| where the oracle is exactly zero (a softmax over one key has
    no gradient w.r.t. its query and key: T = 1 temporal heads)."""
    if expected.abs().max() == 0:
        return actual.double().abs().max().item()
    return relative_error(actual, expected)


# Bounds on oracle_error(result, float64 oracle), for outputs and every gradient alike, per op,
# backend and dtype of the run: about 3x the worst error measured over every test that uses the
# bound, seeds 0-4 (0-2 for the interpreted Triton kernels). `VIVIT_TEST_SEED=<seed>
# VIVIT_ERROR_LOG=<file> pytest <test files>` records each comparison as a JSON line. An indexing
# or stride mistake gives errors of order 1. fp16 / bf16 have no fixed bound: they must stay within
# 2x the error of the reference run in that precision (FlashAttention's yardstick).
TOLERANCES: dict[tuple[str, str, torch.dtype], float] = {
    ("attention", "reference", torch.float64): 4e-15,  # measured 1.4e-15
    ("attention", "sdpa", torch.float64): 5e-15,  # measured 1.8e-15
    ("attention", "cpu", torch.float64): 1e-14,  # measured 3.1e-15
    ("attention", "cpu", torch.float32): 6e-6,  # measured 1.9e-6 (joint over 980 tokens)
    ("attention", "triton", torch.float32): 1e-5,  # measured 3.1e-6 (head dim 128)
    ("tubelet", "reference", torch.float64): 4e-15,  # measured 1.2e-15
    ("tubelet", "cpu", torch.float64): 1.4e-14,  # measured 4.6e-15: sums over 4096-element tubes, 5488 tubes
    ("tubelet", "cpu", torch.float32): 2e-6,  # measured 6.6e-7
    ("tubelet", "triton", torch.float32): 1e-6,  # measured 3.5e-7
    # Compiled for a GPU, fp32 dots are three tf32 products (tf32x3): not measured here (no GPU),
    # the bound the tests had before.
    ("attention", "triton:cuda", torch.float32): 1e-5,
    ("tubelet", "triton:cuda", torch.float32): 1e-5,
}


def assert_near_oracle(
    actual: torch.Tensor,
    expected: torch.Tensor,
    backend: str,
    what: str = "out",
    dtype: torch.dtype | None = None,
    op: str = "attention",
) -> None:
    """oracle_error(actual, expected) below TOLERANCES[op, backend, dtype] (dtype: actual's; the
    backend "triton:cuda" for the compiled kernels' results)."""
    dtype = actual.dtype if dtype is None else dtype
    backend = backend if actual.device.type == "cpu" else f"{backend}:{actual.device.type}"
    error, bound = oracle_error(actual.cpu(), expected.cpu()), TOLERANCES[op, backend, dtype]
    if os.environ.get("VIVIT_ERROR_LOG"):
        with open(os.environ["VIVIT_ERROR_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            record = dict(
                op=op, backend=backend, dtype=str(dtype).removeprefix("torch."), what=what, error=error, test=test
            )
            log.write(json.dumps(record) + "\n")
    assert error < bound, f"{what}: error {error:.2e}, bound {bound:.0e} ({op}, {backend}, {dtype})"


def packed_qkv(B, H, N, Dh, *, dtype=torch.float64, device="cpu", generator=None, requires_grad=True):
    """q, k, v as (B, H, N, Dh) strided views of one packed (B, N, 3, H, Dh) projection, and the pack."""
    qkv = torch.randn(B, N, 3, H, Dh, dtype=dtype, device=device, generator=generator)
    qkv.requires_grad_(requires_grad)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v, qkv


# Prefix tokens and token layouts: (P, T, S, layout). Grids not multiples of any block; T = 1 and
# S = 1 edge cases; P > 1 (register tokens) so prefix rows of several tokens are exercised.
PREFIX_CASES = [
    (1, 3, 7, "time_major"),
    (1, 5, 7, "space_major"),
    (3, 3, 10, "time_major"),
    (2, 4, 1, "space_major"),
    (1, 1, 12, "space_major"),
    (3, 5, 20, "space_major"),
]


# Non-contiguous layouts, each with strides of its own, for tensors of 3 or more dims:
#   swapped: the two dims before the last swapped in memory ((B, H, N, Dh) stored (B, N, H, Dh),
#            a projection's layout; (B, N, C) stored (N, B, C));
#   padded: rows of the last dim padded by 8 elements (a padded head dim);
#   offset: the slice from index 1 in every dim of a buffer one larger in each (a bigger tensor's
#           strides, a storage offset);
#   reversed: dims in reverse memory order, so the last dim is not unit-stride.
# Buffer elements outside the view are NaN: whatever reads them through wrong strides shows it.
LAYOUTS = ("swapped", "padded", "offset", "reversed")


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x's values (detached) in a fresh non-contiguous view of `layout` (one of LAYOUTS)."""
    shape, options = x.shape, dict(dtype=x.dtype, device=x.device)
    if layout == "swapped":
        view = torch.empty(*shape[:-3], shape[-2], shape[-3], shape[-1], **options).transpose(-3, -2)
    elif layout == "padded":
        view = torch.full((*shape[:-1], shape[-1] + 8), float("nan"), **options)[..., : shape[-1]]
    elif layout == "offset":
        view = torch.full([n + 1 for n in shape], float("nan"), **options)[(slice(1, None),) * x.dim()]
    elif layout == "reversed":
        view = torch.empty(shape[::-1], **options).permute(*reversed(range(x.dim())))
    else:
        raise ValueError(layout)
    return view.copy_(x.detach())


def distinct_layouts(*tensors: torch.Tensor, shift: int = 0) -> list[torch.Tensor]:
    """The tensors' values, each in a non-contiguous layout of its own: LAYOUTS in turn from `shift`."""
    views = [in_layout(x, LAYOUTS[(i + shift) % len(LAYOUTS)]) for i, x in enumerate(tensors)]
    assert not any(x.is_contiguous() for x in views) and len({x.stride() for x in views}) == len(views)
    return views


# (P, T, S, layout, scale) of the layout tests: a plain grid with its own scale, and register
# tokens before a space-major grid. Few, short groups: the Triton interpreter runs them too.
STRIDE_GRIDS = [(0, 3, 5, "time_major", 0.3), (2, 3, 5, "space_major", None)]


def every_layout_case(test):
    """Parametrise a layout test over `grid` (STRIDE_GRIDS), `mode` (MODES) and `packed` (both ops)."""
    test = pytest.mark.parametrize("packed", [False, True], ids=["qkv", "packed"])(test)
    test = pytest.mark.parametrize("mode", MODES)(test)
    return pytest.mark.parametrize("grid", STRIDE_GRIDS, ids=lambda g: f"P{g[0]}-{g[3]}")(test)


def check_distinct_layouts(
    backend: str,
    grid: tuple,
    mode: str,
    packed: bool,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    grids: list[tuple] = STRIDE_GRIDS,
) -> None:
    """The q/k/v op (or the packed op) with q, k, v and the output gradient (or qkv and the output
    gradient) each in a layout of its own: out and every gradient against the float64 oracle.
    `grid` is one of `grids` (P, T, S, layout, scale)."""
    P, T, S, layout, scale = grid
    B, H, N, Dh = 2, 2, P + T * S, 24  # Dh 24: masked head-dim lanes in the Triton kernels
    q, k, v, grad = (torch.randn(B, H, N, Dh, generator=generator, dtype=torch.float64).to(dtype) for _ in range(4))
    expected = oracle_and_grads(q, k, v, grad, T, mode, P, layout, scale)
    options = dict(num_prefix_tokens=P, layout=layout, backend=backend)
    # Every test of a backend starts the layouts at a different tensor.
    shift = grids.index(grid) + MODES.index(mode) + packed
    if packed:
        qkv = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).flatten(2)  # (B, N, 3 * H * Dh)
        qkv, grad = distinct_layouts(qkv.to(device), grad.transpose(1, 2).flatten(2).to(device), shift=shift)
        out = factorised_attention_packed(qkv.requires_grad_(), H, T, mode, scale, **options)
        (dqkv,) = torch.autograd.grad(out, qkv, grad)
        results = (split_heads(out, H), *unpack_qkv(dqkv, H))
    else:
        q, k, v, grad = distinct_layouts(*(x.to(device) for x in (q, k, v, grad)), shift=shift)
        out = factorised_attention(
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), T, mode, scale, **options
        )
        results = (out, *torch.autograd.grad(out, (q, k, v), grad))
    for name, actual, want in zip(("out", "dq", "dk", "dv"), results, expected):
        assert not actual.isnan().any().item(), f"{name} has NaN elements (unwritten, or read from outside an input)"
        assert_near_oracle(actual, want, backend, name, dtype)


def check_tubelet_distinct_layouts(
    backend: str, shift: int, generator: torch.Generator, dtype: torch.dtype = torch.float64, device: str = "cpu"
) -> None:
    """tubelet_embedding with video, weight, pos_embed and the output gradient each in a layout of
    its own (LAYOUTS in turn from `shift`): tokens and every gradient against F.conv3d in float64;
    from the fused backends, d(video) in the video's layout where that is dense."""
    video, weight, bias, pos_embed, grad = (
        torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        for shape in ((2, 3, 5, 9, 13), (7, 3, 2, 4, 4), (7,), (2, 2 * 3, 7), (2, 2, 2 * 3, 7))
    )
    exact = [x.double().requires_grad_() for x in (video, weight, bias, pos_embed)]
    expected = F.conv3d(exact[0], exact[1], exact[2], stride=(2, 4, 4)).flatten(3).permute(0, 2, 3, 1) + exact[3]
    expected = (expected, *torch.autograd.grad(expected, exact, grad.double()))
    video, weight, pos_embed, grad = distinct_layouts(
        *(x.to(device) for x in (video, weight, pos_embed, grad)), shift=shift
    )
    inputs = [x.requires_grad_() for x in (video, weight, bias.to(device), pos_embed)]
    tokens = tubelet_embedding(*inputs, backend=backend)
    results = (tokens, *torch.autograd.grad(tokens, inputs, grad))
    for name, actual, want in zip(("tokens", "dvideo", "dweight", "dbias", "dpos"), results, expected):
        assert_near_oracle(actual, want, backend, name, dtype, op="tubelet")
    if backend != "reference" and LAYOUTS[shift % len(LAYOUTS)] in ("swapped", "reversed"):  # dense ones
        assert results[1].stride() == video.stride()


def oracle_and_grads(q, k, v, grad_out, frames, mode, prefix, layout, scale=None):
    """The oracle's output and its gradients w.r.t. q, k, v for `grad_out`, in float64."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = masked_attention(q, k, v, frames, mode, scale, prefix, layout)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out.double()))


def grid_coordinates(frames: int, spatial: int, layout: str = "time_major") -> tuple[torch.Tensor, torch.Tensor]:
    """(t, s) of each grid token, in token order: time-major n = t * S + s, space-major n = s * T + t."""
    n = torch.arange(frames * spatial)
    if layout == "time_major":
        return n // spatial, n % spatial
    return n % frames, n // frames


def group_mask(frames: int, spatial: int, mode: str, prefix: int = 0, layout: str = "time_major") -> torch.Tensor:
    """(N, N) boolean: may grid-or-prefix token i attend to token j? Prefix queries of spatial
    heads attend frame by frame: their rows here allow the prefix only (see masked_attention)."""
    t, s = grid_coordinates(frames, spatial, layout)
    N = prefix + frames * spatial
    mask = torch.zeros(N, N, dtype=torch.bool)
    if mode == "joint":
        return mask | True
    mask[:prefix, :prefix] = True  # the prefix among itself
    if mode == "spatial":
        mask[prefix:, :prefix] = True  # grid tokens see the prefix
        mask[prefix:, prefix:] = t[:, None] == t[None, :]
    elif mode == "temporal":
        mask[prefix:, prefix:] = s[:, None] == s[None, :]
    else:
        raise ValueError(mode)
    return mask


def _masked_softmax_attention(q, k, v, mask, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~mask.to(q.device), float("-inf")).softmax(-1) @ v


def masked_attention(
    q, k, v, frames: int, mode: str, scale: float | None = None, prefix: int = 0, layout: str = "time_major"
) -> torch.Tensor:
    """The independent oracle: dense N x N attention with each mode's mask, in float64. A spatial
    head's prefix queries attend to the prefix and frame f, for every f, and average the T results."""
    H, N, Dh = q.shape[1:]
    S = (N - prefix) // frames
    scale = Dh**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    modes = ["spatial"] * (H // 2) + ["temporal"] * (H - H // 2) if mode == "split" else [mode] * H
    heads = []
    for h, head_mode in enumerate(modes):
        qh, kh, vh = q[:, h], k[:, h], v[:, h]
        out = _masked_softmax_attention(qh, kh, vh, group_mask(frames, S, head_mode, prefix, layout), scale)
        if head_mode == "spatial" and prefix:
            t, _ = grid_coordinates(frames, S, layout)
            per_frame = []
            for f in range(frames):
                keys = torch.cat([torch.ones(prefix, dtype=torch.bool), t == f])
                per_frame.append(
                    _masked_softmax_attention(qh[:, :prefix], kh, vh, keys[None, :].expand(prefix, -1), scale)
                )
            out = torch.cat([torch.stack(per_frame).mean(0), out[:, prefix:]], dim=1)
        heads.append(out)
    return torch.stack(heads, dim=1)


def require_transformers(reason: str):
    """transformers, else a skip with `reason` (at module level too). It imports lazily: without a
    dependency of its models (safetensors) `import transformers` succeeds and the first model class
    fails, so one is fetched here."""
    __tracebackhide__ = True  # a skip names the test module that asked
    transformers = pytest.importorskip("transformers", reason=reason)
    try:
        transformers.PreTrainedModel  # noqa: B018
    except ImportError as error:
        cause = error.__cause__ or error
        pytest.skip(f"{reason}: its models cannot be imported here ({cause})", allow_module_level=True)
    return transformers


def require_cpu_kernels() -> None:
    """Load the cpu backend's C++ library (built once if needed), else skip saying why: only where
    no toolchain exists (no compiler, no ninja), since a failed build with one is a failure."""
    __tracebackhide__ = True  # a skip names the test that asked
    from vivit_kernels import _extension
    from vivit_kernels.backends import cpu

    try:
        cpu.load()
    except RuntimeError as error:
        if not _extension._cannot_build():
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def cpu_kernels():
    """The cpu backend's C++ library: see require_cpu_kernels."""
    require_cpu_kernels()


@pytest.fixture
def poisoned():
    """Every torch.empty (the kernels' outputs included) is filled with NaN: unwritten output shows."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def generator():
    """A fresh, seeded generator per test: random inputs that are reproducible when a test fails.
    Seed 0, or $VIVIT_TEST_SEED (to measure errors over other inputs)."""
    return torch.Generator().manual_seed(int(os.environ.get("VIVIT_TEST_SEED", "0")))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a busy machine a second OpenMP thread
    mostly waits for the first (measured 30x slower with two). The kernels' own tests run on
    every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
