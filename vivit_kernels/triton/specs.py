"""Ahead-of-time compile specs: every kernel instance the autotuners may run, for `inspect.py`.

One `CompileSpec` per (kernel, autotune config, dtype, static variant). The kernel modules keep
the kernels, their autotune tables and launchers; this module only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import tubelet

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class CompileSpec:
    """One kernel instance to compile ahead of time for a GPU target."""

    name: str  # e.g. "attention_fwd[fp16, BLOCK_M=128, BLOCK_N=64, BLOCK_D=64, warps=8, stages=3]"
    fn: Any  # the @jit function (not the autotuner wrapping it)
    signature: dict[str, str]  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments (block sizes, switches)
    num_warps: int = 4
    num_stages: int = 2
    dtype: str = "fp32"  # the input dtype this instance serves: fp32, fp16 or bf16
    autotune_candidate: bool = True  # may the autotuner pick it? (such configs must not spill)


# ---------------------------------------------------------------------------------------------
# Tubelet embedding.

_TUBELET_POINTERS = {"video", "weight", "bias", "pos", "out", "grad", "dvideo", "dweight", "dbias", "dpos"}
_TUBELET_PARTIALS = {"dweight", "dbias"}  # fp32 per-chunk sums when d(weight) is split (PARTIAL)


def _tubelet_signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    """Triton types of `fn`'s arguments, in order: pointers to `dtype` (fp32 for split
    d(weight)'s partials), i32 sizes and strides."""

    def pointer(name: str) -> str:
        return "*fp32" if constexprs.get("PARTIAL") and name in _TUBELET_PARTIALS else f"*{dtype}"

    return {
        name: "constexpr" if name in constexprs else pointer(name) if name in _TUBELET_POINTERS else "i32"
        for name in fn.arg_names
    }


def tubelet_specs() -> list[CompileSpec]:
    """One spec per (kernel, autotune config, dtype, variant), with bias and pos_embed on, at
    ViViT's 2 x 16 x 16 tubelet (the tubelet is a compile-time constant) and unit inner strides.
    d(weight) has two variants: one pass (SPLIT = 1, which a launch makes a constant) and the
    token reduction split into fp32 partials (PARTIAL), what ViViT-B sizes run."""
    static = {"t": 2, "h": 16, "w": 16, "stride_vw": 1, "stride_wk": 1}
    variants = {
        "fwd": [({"HAS_BIAS": True, "HAS_POS": True, "UPCAST": False}, "")],
        "bwd_video": [({"UPCAST": False}, "")],
        "bwd_weight": [
            ({"HAS_BIAS": True, "PARTIAL": False, "UPCAST": False, "SPLIT": 1}, ""),
            ({"HAS_BIAS": True, "PARTIAL": True, "UPCAST": False}, ", PARTIAL"),
        ],
    }
    specs = []
    for dtype in DTYPES:
        bits = "32" if dtype == "fp32" else "16"
        for kernel, fn in tubelet._KERNELS.items():
            for config in tubelet._GPU_CONFIGS[kernel][bits]:
                for switches, label in variants[kernel]:
                    constexprs = {**switches, **config.kwargs}
                    constexprs.update({k: v for k, v in static.items() if k in fn.arg_names})
                    blocks = ", ".join(f"{key}={value}" for key, value in config.kwargs.items())
                    launch = f"warps={config.num_warps}, stages={config.num_stages}"
                    specs.append(
                        CompileSpec(
                            name=f"tubelet_{kernel}[{dtype}, {blocks}{label}, {launch}]",
                            fn=fn,
                            signature=_tubelet_signature(fn, dtype, constexprs),
                            constexprs=constexprs,
                            num_warps=config.num_warps,
                            num_stages=config.num_stages,
                            dtype=dtype,
                        )
                    )
        pos = {"UPCAST": False, **tubelet._POS_CONFIG}
        blocks = ", ".join(f"{key}={value}" for key, value in tubelet._POS_CONFIG.items())
        specs.append(
            CompileSpec(
                name=f"tubelet_bwd_pos[{dtype}, {blocks}, warps=4, stages=2]",
                fn=tubelet.tubelet_bwd_pos_kernel,
                signature=_tubelet_signature(tubelet.tubelet_bwd_pos_kernel, dtype, pos),
                constexprs=pos,
                num_warps=4,
                num_stages=2,
                dtype=dtype,
            )
        )
    return specs


def compile_specs() -> list[CompileSpec]:
    """Every spec of the tubelet kernels (the attention kernels are inspected from recorded launches)."""
    return tubelet_specs()
