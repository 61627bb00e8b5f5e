"""`python -m vivit_kernels.report`: every attention mode through every backend that runs here.

For each (mode, backend): max relative error against the float64 reference, median
forward+backward time, and bytes saved for backward. ViViT-B shapes by default; a backend that
"auto" passes over although it runs when named (the Triton interpreter, on a machine without a
GPU) is checked on a small shape, with the reason, and never timed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import backends, reference
from .attention import factorised_attention
from .checks import MODES, AttentionShape
from .memory import saved_bytes

VIVIT_B = dict(B=1, T=8, S=196, H=12, Dh=64)
INTERPRETER_SHAPE = dict(B=1, T=3, S=20, H=2, Dh=64)


def _inputs(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """q, k, v as views of one packed (B, N, 3, H, Dh) projection, as FactorisedAttention makes them."""
    g = torch.Generator().manual_seed(seed)
    N = shape["T"] * shape["S"]
    qkv = torch.randn(shape["B"], N, 3, shape["H"], shape["Dh"], generator=g).to(device, dtype).requires_grad_()
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up (and autotunes)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(mode: str, backend: str, shape: dict, device, dtype, repeats: int, timed: bool) -> dict:
    qkv, (q, k, v) = _inputs(shape, device, dtype)
    out = factorised_attention(q, k, v, shape["T"], mode, backend=backend)
    expected = reference.factorised_attention(*(x.detach().double() for x in (q, k, v)), shape["T"], mode)
    error = ((out.double() - expected).abs().max() / expected.abs().max()).item()

    def step():
        qkv.grad = None
        factorised_attention(q, k, v, shape["T"], mode, backend=backend).sum().backward()

    return {
        "error": error,
        "ms": _median_ms(step, repeats, device) if timed else None,
        "saved": saved_bytes(factorised_attention, q, k, v, shape["T"], mode, backend=backend),
    }


def _shape_text(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward passes (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32

    print(f"factorised attention, forward+backward, {dtype}, {device}, ViViT-B shape ({_shape_text(VIVIT_B)})")
    header = f"{'mode':<9} {'backend':<10} {'max rel err':>12} {'median ms':>10} {'saved MB':>9}  note"
    print(header + "\n" + "-" * len(header))
    footnotes: dict[str, str] = {}  # the same reason holds for every mode: said once, under the table

    def footnote(text: str) -> str:
        return footnotes.setdefault(text, f"[{len(footnotes) + 1}]")

    for mode in MODES:
        for name in backends.names():
            backend = backends.get(name)
            B, T, S, H, Dh = (VIVIT_B[key] for key in ("B", "T", "S", "H", "Dh"))
            request = backends.Request("attention", device, dtype, AttentionShape.of((B, H, T * S, Dh), T, mode))
            reasons = backend.not_supported_reasons(request)
            if reasons:
                note = footnote(f"{name}: {', '.join(reasons)}")
                print(f"{mode:<9} {name:<10} {'-':>12} {'-':>10} {'-':>9}  unavailable {note}")
                continue
            only_named = backend.auto_reasons(request) if backend.auto else []
            shape = INTERPRETER_SHAPE if only_named else VIVIT_B
            row = measure(mode, name, shape, device, dtype, args.repeats, timed=not only_named)
            ms = "-" if row["ms"] is None else f"{row['ms']:.1f}"
            note = ""
            if only_named:
                reason = f"{name}: {', '.join(only_named)}; checked at {_shape_text(shape)}, not timed"
                note = f"small shape {footnote(reason)}"
            print(f"{mode:<9} {name:<10} {row['error']:>12.1e} {ms:>10} {row['saved'] / 2**20:>9.1f}  {note}".rstrip())
    for text, mark in footnotes.items():
        print(f"{mark} {text}")


if __name__ == "__main__":
    main()
