"""Each benchmark's result, checked once against its baseline before anything is timed.

A fast wrong implementation must not benchmark green. Before a benchmark times a case, it calls
`check_attention`, `check_tubelet` or `check_training` with the case's spec: the implementation
runs once on the benchmark's own shape, device and dtype, and its output, and the gradients where
the benchmark times backward, are compared with an oracle, the einsum baseline ("reference") in
float64 for fp32 targets and in float32 for fp16/bf16 ones, fed the same (rounded) inputs.

The tolerance is the honest yardstick of tests/ (FlashAttention's rule): the implementation's
error, max |x - oracle| / max |oracle|, may be at most twice the error of the baseline itself run
in the target dtype, plus a floor for a different summation order (`FLOOR`). A wrong index,
scale or layout is off by O(1); a right implementation by a few units of rounding.

The oracle and the baseline's error are computed once per case and shared by the
implementations benchmarked after it (the backend is the innermost parameter of every suite).
The attention oracle runs one head at a time, so its score matrices take one head's memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vivit_kernels import reference

from .attention import attention_fn
from .core import BACKWARD, BASELINE, dtype_name, parse_target, relative_error
from .training import training_model
from .tubelet import tubelet_fn

# What the oracle runs in: float64 for fp32 targets, float32 for fp16/bf16 (STYLE.md).
ORACLE_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}
# Allowed beyond twice the baseline's own error. fp32, measured on the CPU at the smoke and the
# ViViT-B shapes, the einsum's own error is 1e-7 to 1.9e-6; the fused backends and SDPA are at
# most 1.4e-6 from the oracle in attention (dqkv, joint over 3136 tokens) and 2.1e-6 in a training
# step's gradients, within 3x the einsum's; torch's Conv3d is 1.7e-6 from it, 10x the einsum's
# tokens error. The floor is 2.5x the largest. fp16/bf16: one unit of rounding (there the rule
# itself carries the tolerance).
FLOOR = {torch.float32: 5e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def errors(results: dict, oracle: dict) -> dict[str, float]:
    """The relative error of each entry of `results` against the oracle's."""
    return {name: relative_error(results[name], expected) for name, expected in oracle.items()}


def compare(what: str, measured: dict, oracle: dict, plain: dict[str, float], dtype: torch.dtype) -> None:
    """AssertionError naming the first entry of `measured` further from `oracle` than the rule
    allows, given the baseline's errors `plain` in the target dtype."""
    missing = [name for name in oracle if name not in measured]
    if missing:
        raise AssertionError(f"{what}: no {', '.join(missing[:4])}")
    for name, error in errors(measured, oracle).items():
        allowed = 2 * plain[name] + FLOOR[dtype]
        if not error <= allowed:  # NaN fails too
            raise AssertionError(
                f"{what}: {name} is {error:.2e} from the einsum oracle, relative to its largest value; the einsum "
                f"baseline run in {dtype_name(dtype)} is {plain[name]:.2e} from it (allowed: 2 x {plain[name]:.2e} + "
                f"{FLOOR[dtype]:.1e})"
            )


class _Cache:
    """The oracle's results and the baseline's errors of the last case checked (one entry: a
    case's implementations are checked one after another)."""

    key: tuple | None = None
    value: tuple[dict, dict] | None = None

    def get(self, key: tuple, compute: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
        if key != self.key:
            self.key, self.value = None, None  # free the previous case's tensors first
            self.value = compute()
            self.key = key
        return self.value


_cache = _Cache()


def _oracle_and_plain(results: Callable[[torch.dtype], dict], dtype: torch.dtype) -> tuple[dict, dict]:
    """The oracle's results (the baseline in ORACLE_DTYPE) and the baseline's errors in `dtype`."""
    oracle = results(ORACLE_DTYPE[dtype])
    return oracle, errors(results(dtype), oracle)


def _spec_key(spec: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in spec.items() if k != "backend"))


def _on_cpu(results: dict) -> dict:
    return {name: value.detach().cpu() for name, value in results.items()}


# ----------------------------------------------------------------------------------- attention


def _attention_inputs(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3 * H * Dh) and the output's gradient (B, N, H * Dh), in float32 on the CPU."""
    shape = spec["shape"]
    B, N, H, Dh = shape["B"], shape["T"] * shape["S"], shape["H"], shape["Dh"]
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, N, 3 * H * Dh, generator=g), torch.randn(B, N, H * Dh, generator=g)


def _head_by_head(spec: dict, qkv: torch.Tensor, grad: torch.Tensor | None) -> dict:
    """The einsum attention of a packed qkv (q, k, v side by side, each (H, Dh) head-major), one
    head at a time ("split": the first half of the heads spatial, the second temporal), and the
    gradient of qkv for `grad`."""
    shape, mode = spec["shape"], spec["mode"]
    B, N, H, Dh, T = qkv.shape[0], qkv.shape[1], shape["H"], shape["Dh"], shape["T"]
    qkv = qkv.detach().requires_grad_(grad is not None)
    heads = qkv.view(B, N, 3, H, Dh)
    outs = []
    for h in range(H):
        head_mode = ("spatial" if h < H // 2 else "temporal") if mode == "split" else mode
        q, k, v = (heads[:, :, i, h].unsqueeze(1) for i in range(3))  # (B, 1, N, Dh)
        out = reference.factorised_attention(q, k, v, T, head_mode)
        if grad is not None:
            out.backward(grad.view(B, N, H, Dh)[:, :, h].unsqueeze(1))
        outs.append(out.detach().squeeze(1))
    results = {"output": torch.stack(outs, 2).reshape(B, N, H * Dh)}
    if grad is not None:
        results["qkv gradient"] = qkv.grad
    return results


def _attention_results(spec: dict, fn: Callable | None, run_dtype: torch.dtype) -> dict:
    """The output (and qkv's gradient, for the backward pass) of `fn`, or of the head-by-head
    einsum when `fn` is None, on inputs rounded to the target dtype and run in `run_dtype`."""
    device, dtype = parse_target(spec["target"])
    qkv, grad = (x.to(device, dtype).to(run_dtype) for x in _attention_inputs(spec))
    backward = spec["pass"] == BACKWARD
    if fn is None:
        return _on_cpu(_head_by_head(spec, qkv, grad if backward else None))
    qkv.requires_grad_(backward)
    out = fn(qkv, spec["shape"]["H"], spec["shape"]["T"], spec["mode"])
    results = {"output": out}
    if backward:
        out.backward(grad)
        results["qkv gradient"] = qkv.grad
    return _on_cpu(results)


def check_attention(spec: dict) -> None:
    """AssertionError unless the benchmarked attention's output (and qkv gradient) is as near the
    oracle as the rule allows (see the module docstring)."""
    _, dtype = parse_target(spec["target"])
    oracle, plain = _cache.get(
        ("attention", _spec_key(spec)),
        lambda: _oracle_and_plain(lambda run: _attention_results(spec, None, run), dtype),
    )
    measured = _attention_results(spec, attention_fn(spec["backend"]), dtype)
    compare(f"attention {spec['mode']} {spec['pass']} {spec['backend']}", measured, oracle, plain, dtype)


# ------------------------------------------------------------------------------------- tubelet


def _tubelet_results(spec: dict, fn: Callable, run_dtype: torch.dtype) -> dict:
    """The tokens (and the weight's, bias's and positional embedding's gradients, for the
    backward pass) of `fn`, on inputs rounded to the target dtype and run in `run_dtype`."""
    device, dtype = parse_target(spec["target"])
    shape = spec["shape"]
    B, C, T, H, W, D = (shape[k] for k in ("B", "C", "T", "H", "W", "D"))
    tubelet = (shape["t"], shape["h"], shape["w"])
    nt, S = T // tubelet[0], (H // tubelet[1]) * (W // tubelet[2])
    g = torch.Generator().manual_seed(1)
    drawn = (
        torch.randn(B, C, T, H, W, generator=g),
        torch.randn(D, C, *tubelet, generator=g) * 0.02,
        torch.randn(D, generator=g),
        torch.randn(nt, S, D, generator=g),
        torch.randn(B, nt, S, D, generator=g),
    )
    video, weight, bias, pos, grad = (x.to(device, dtype).to(run_dtype) for x in drawn)
    params = {"weight gradient": weight, "bias gradient": bias, "pos_embed gradient": pos}
    backward = spec["pass"] == BACKWARD
    for p in params.values():
        p.requires_grad_(backward)
    out = fn(video, weight, bias, pos, tubelet)
    results = {"tokens": out}
    if backward:
        out.backward(grad)
        results.update({name: p.grad for name, p in params.items()})
    return _on_cpu(results)


def check_tubelet(spec: dict) -> None:
    """AssertionError unless the benchmarked tubelet embedding's tokens (and parameter gradients)
    are as near the oracle as the rule allows (see the module docstring)."""
    _, dtype = parse_target(spec["target"])
    einsum = tubelet_fn(BASELINE)
    oracle, plain = _cache.get(
        ("tubelet", _spec_key(spec)), lambda: _oracle_and_plain(lambda run: _tubelet_results(spec, einsum, run), dtype)
    )
    measured = _tubelet_results(spec, tubelet_fn(spec["backend"]), dtype)
    compare(f"tubelet {spec['pass']} {spec['backend']}", measured, oracle, plain, dtype)


# ------------------------------------------------------------------------------- training step


def _training_results(spec: dict, backend: str, run_dtype: torch.dtype) -> dict:
    """The loss and every parameter's gradient of one step of the case's model with `backend`:
    in float64 or float32, or under autocast to fp16/bf16 (as GPUs run the step) with fp32 weights."""
    model, video, labels = training_model(dict(spec, backend=backend))
    weights = torch.float64 if run_dtype == torch.float64 else torch.float32
    model.to(weights).train()
    low_precision = run_dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(video.device.type, dtype=run_dtype, enabled=low_precision):
        loss = F.cross_entropy(model(video.to(weights)), labels)
    loss.backward()
    results = {"loss": loss.detach().reshape(1)}
    results.update({f"{name} gradient": p.grad for name, p in model.named_parameters() if p.grad is not None})
    return _on_cpu(results)


def check_training(spec: dict) -> None:
    """AssertionError unless one step of the benchmarked model has the loss and parameter
    gradients of the einsum model, as near the oracle as the rule allows. The einsum model itself
    is the baseline: nothing to check."""
    if spec["backend"] == BASELINE:
        return
    _, dtype = parse_target(spec["target"])
    oracle, plain = _oracle_and_plain(lambda run: _training_results(spec, BASELINE, run), dtype)
    measured = _training_results(spec, spec["backend"], dtype)
    compare(f"training {spec['variant']} {spec['backend']}", measured, oracle, plain, dtype)
