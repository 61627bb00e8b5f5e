"""Loading the C++ CPU kernels (csrc/) into the process.

Two ways in: the binary `setup.py` built at install time (vivit_kernels/_csrc*.so), or, when it
is absent or older than the sources, a build on first use with torch's extension tools (ninja)
into a cache directory named by a hash of the sources, so a changed source never loads a stale
binary. Loading registers the ops `torch.ops.vivit_kernels.cpu_*`.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
CSRC = _PACKAGE.parent / "csrc"
SOURCES = ("attention.cpp", "block_math.cpp", "tubelet.cpp", "ops.cpp")
HEADERS = ("kernels.h",)
# -fopenmp at compile AND link time, or at::parallel_for runs on one thread. No -march=native:
# the binary may move to another machine.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_loaded: str | None = None  # path of the loaded library
_error: str | None = None  # why it could not be loaded


def sources_hash() -> str:
    """A digest of the C++ sources and the build flags: the name of the lazy build's directory."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def prebuilt() -> Path | None:
    """The library built by setup.py, unless a source is newer than it (then it may be stale)."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE / f"_csrc{suffix}"
        if path.exists():
            if CSRC.is_dir() and any((CSRC / n).stat().st_mtime > path.stat().st_mtime for n in SOURCES + HEADERS):
                return None
            return path
    return None


def _cannot_build() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    if not all((CSRC / name).exists() for name in SOURCES + HEADERS):
        return f"the C++ sources are not installed (expected {CSRC}); reinstall vivit-kernels from source"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found): install g++ (e.g. `apt install g++`) or set CXX"
    if not is_ninja_available():
        return "ninja is not installed: `pip install ninja`"
    return None


def build(build_root: str | os.PathLike | None = None) -> Path:
    """Compile the sources (or reuse a build of these exact sources) and load the library.

    `build_root` defaults to $VIVIT_KERNELS_CACHE, else torch's extension cache directory.
    """
    from torch.utils import cpp_extension

    reason = _cannot_build()
    if reason:
        raise RuntimeError(reason)
    root = Path(build_root or os.environ.get("VIVIT_KERNELS_CACHE") or cpp_extension.get_default_build_root())
    name = f"vivit_kernels_csrc_{sources_hash()}"
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{name}.so"
    if not library.exists():
        print(f"vivit_kernels: compiling the C++ CPU kernels into {directory} (once, ~30 s)", file=sys.stderr)
    cpp_extension.load(
        name=name,
        sources=[str(CSRC / s) for s in SOURCES],
        # Copies: cpp_extension.load appends its own flags to these lists in place.
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return library


def load(use_prebuilt: bool = True, build_root: str | os.PathLike | None = None) -> str:
    """Load the library once per process; returns its path. Raises RuntimeError saying why not."""
    global _loaded, _error
    if _loaded:
        return _loaded
    if _error:
        raise RuntimeError(_error)
    import torch

    try:
        path = prebuilt() if use_prebuilt else None
        if path is not None:
            torch.ops.load_library(str(path))
        else:
            path = build(build_root)
    except Exception as error:  # a missing compiler, a failed compile or link, an unloadable binary
        lines = [line for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
        _error = f"the C++ kernels are not available: {lines[0].strip()}"
        raise RuntimeError(_error) from error
    _loaded = str(path)
    return _loaded
