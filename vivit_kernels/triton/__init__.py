"""Triton kernels: fused attention and tubelet embedding, compiled for CUDA GPUs or interpreted.

Whether this process runs them compiled or under Triton's interpreter (on CPU tensors) is
decided once, when this package is imported: TRITON_INTERPRET=1 interprets and
TRITON_INTERPRET=0 compiles, as in Triton; unset, the kernels are interpreted exactly when there
is no CUDA device, the only way they can run there. Triton fixes interpreted-or-compiled when a
function is decorated, its own library functions (tl.sum, tl.cdiv, ...) included, so in that
case this package sets TRITON_INTERPRET=1 before triton is first imported (importing
`vivit_kernels` imports this package first).

This package's `__init__` needs no triton; its kernel modules do, and the backend module
(`vivit_kernels.backends.triton`) imports them only when a kernel runs.
"""

from __future__ import annotations

import os
import sys

# The largest element offset an int32 index map holds: the tubelet kernels index inside one clip
# with int32, and the backend declares this limit so larger clips never reach them.
INT32_MAX = 2**31 - 1


def _decide() -> bool:
    flag = os.environ.get("TRITON_INTERPRET")
    if flag is not None:
        return flag.strip().lower() in ("1", "true", "on", "yes")
    import torch

    return not torch.cuda.is_available()


_INTERPRETED = _decide()
# Set when triton was imported compiled before this package could ask for the interpreter.
_IMPORTED_COMPILED = _INTERPRETED and "TRITON_INTERPRET" not in os.environ and "triton" in sys.modules
if _INTERPRETED and "TRITON_INTERPRET" not in os.environ and not _IMPORTED_COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"


def interpreted() -> bool:
    """Do this process's Triton kernels run under the interpreter (on CPU tensors)?"""
    return _INTERPRETED


def unusable() -> str | None:
    """Why the kernels cannot run in this process, or None."""
    if _IMPORTED_COMPILED:
        return (
            "triton was imported, compiled, before vivit_kernels on a machine without a CUDA device; "
            "set TRITON_INTERPRET=1 before importing triton to run the kernels interpreted"
        )
    return None
