"""Which autotune candidate may run where, read from compiles of real launches.

Written by `python -m vivit_kernels.triton.inspect --write-limits`, which compiles every candidate
of every kernel as a launch at ViViT-B shapes specialises it, for the dtypes, head dims and
architectures given, with and without prefix tokens, and updates the entries those compiles cover.
LIMITS[candidate]["<dtype bytes>B[ prefix]"][arch] is the largest head dim up to which every
inspected head dim compiled without register spills and within the architecture's shared memory
(0: none did); SOURCES[variant][arch] names the compiles an entry rests on. An architecture not
inspected gets the most cautious limit of those that were.
"""

from __future__ import annotations

INSPECTED_HEAD_DIMS = (16, 32, 40, 64, 80, 96, 128)

SOURCES = {
    "2B": {
        80: "fp16 at head dims 32, 40, 64, 80, 128",
        86: "fp16 at head dims 32, 40, 64, 80, 128",
        89: "fp16 at head dims 32, 40, 64, 80, 128",
        90: "fp16 at head dims 32, 40, 64, 80, 128",
    },
    "2B prefix": {
        80: "fp16 at head dims 32, 40, 64, 80, 128",
        86: "fp16 at head dims 32, 40, 64, 80, 128",
        89: "fp16 at head dims 32, 40, 64, 80, 128",
        90: "fp16 at head dims 32, 40, 64, 80, 128",
    },
    "4B": {
        80: "fp32 at head dims 32, 40, 64, 80, 128",
        86: "fp32 at head dims 32, 40, 64, 80, 128",
        89: "fp32 at head dims 32, 40, 64, 80, 128",
        90: "fp32 at head dims 32, 40, 64, 80, 128",
    },
    "4B prefix": {
        80: "fp32 at head dims 32, 40, 64, 80, 128",
        86: "fp32 at head dims 32, 40, 64, 80, 128",
        89: "fp32 at head dims 32, 40, 64, 80, 128",
        90: "fp32 at head dims 32, 40, 64, 80, 128",
    },
}

LIMITS = {
    "fwd 128x64 w8 s3": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 64, 86: 64, 89: 64, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 32},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 32},
    },
    "fwd 128x32 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 64},
        "4B prefix": {80: 32, 86: 32, 89: 32, 90: 64},
    },
    "fwd 64x64 w4 s3": {
        "2B": {80: 64, 86: 64, 89: 64, 90: 128},
        "2B prefix": {80: 64, 86: 64, 89: 64, 90: 128},
        "4B": {80: 32, 86: 0, 89: 0, 90: 32},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 32},
    },
    "fwd 64x32 w4 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 32},
        "4B prefix": {80: 32, 86: 32, 89: 32, 90: 64},
    },
    "fwd 32x32 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B prefix": {80: 128, 86: 64, 89: 64, 90: 80},
    },
    "fwd 16x32 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 32, 86: 128, 89: 128, 90: 128},
        "4B prefix": {80: 128, 86: 128, 89: 128, 90: 32},
    },
    "dkdv 128x32 w8 s2": {
        "2B": {80: 32, 86: 32, 89: 32, 90: 128},
        "2B prefix": {80: 32, 86: 32, 89: 32, 90: 32},
        "4B": {80: 0, 86: 0, 89: 0, 90: 32},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 32},
    },
    "dkdv 64x32 w8 s2": {
        "2B": {80: 32, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 64},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 64},
    },
    "dkdv 32x32 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 64, 86: 0, 89: 0, 90: 64},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 0},
    },
    "dkdv 16x16 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B prefix": {80: 64, 86: 0, 89: 0, 90: 64},
    },
    "dq 128x32 w8 s2": {
        "2B": {80: 64, 86: 64, 89: 64, 90: 128},
        "2B prefix": {80: 64, 86: 64, 89: 64, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 64},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 64},
    },
    "dq 64x32 w4 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 40, 86: 128, 89: 128, 90: 128},
        "4B": {80: 32, 86: 32, 89: 32, 90: 32},
        "4B prefix": {80: 0, 86: 0, 89: 0, 90: 32},
    },
    "dq 32x16 w8 s2": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 64, 86: 64, 89: 64, 90: 128},
        "4B": {80: 64, 86: 64, 89: 64, 90: 64},
        "4B prefix": {80: 64, 86: 64, 89: 64, 90: 64},
    },
    "dq 16x16 w8 s1": {
        "2B": {80: 128, 86: 128, 89: 128, 90: 128},
        "2B prefix": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B": {80: 128, 86: 128, 89: 128, 90: 128},
        "4B prefix": {80: 80, 86: 80, 89: 80, 90: 80},
    },
}


def variant(element_size: int, prefix: bool) -> str:
    return f"{element_size}B{' prefix' if prefix else ''}"


def allows(candidate: str, element_size: int, head_dim: int, prefix: bool, arch: int) -> bool:
    """May `candidate` (e.g. "fwd 128x64 w8 s3") run on sm_`arch` for this dtype width, head dim and prefix variant?"""
    per_arch = LIMITS[candidate][variant(element_size, prefix)]
    limit = per_arch[arch] if arch in per_arch else min(per_arch.values())
    return head_dim <= limit
