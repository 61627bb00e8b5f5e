"""Loading the C++ CPU kernels (csrc/) into the process.

One rule decides which binary loads: a library is named after a hash of the sources and build
flags it was compiled from and a tag of what it links against (torch's version and C++ ABI, the
Python): `vivit_kernels_csrc_<sources>_<tag>`. Only the one named after the sources and the
torch at hand is loaded, so a changed source or another torch never loads a stale binary, however
it was built.
It is looked for in the package (`vivit_kernels/_csrc/`, built there by `setup.py` at install
time) and then in the build cache ($VIVIT_KERNELS_CACHE, else torch's extension cache); when
neither holds it, it is compiled into the cache on first use with torch's extension tools
(ninja), which are imported only to build. An install without the sources (a wheel) loads the
library it shipped with.
Loading registers the CPU kernels of the ops `torch.ops.vivit_kernels.cpu_*`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
CSRC = _PACKAGE.parent / "csrc"
PACKAGE_BUILD = _PACKAGE / "_csrc"
SOURCES = ("attention.cpp", "autograd.cpp", "block_math.cpp", "tubelet.cpp", "ops.cpp")
HEADERS = ("kernels.h",)
# -fopenmp at compile AND link time, or at::parallel_for runs on one thread. No -march=native:
# the binary may move to another machine.
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)
PREFIX = "vivit_kernels_csrc_"

_loaded: str | None = None  # path of the loaded library
_error: str | None = None  # why it could not be loaded


def have_sources() -> bool:
    return all((CSRC / name).is_file() for name in SOURCES + HEADERS)


def sources_hash() -> str:
    """A digest of the C++ sources and the build flags."""
    digest = hashlib.sha256(" ".join(CFLAGS + LDFLAGS).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def build_tag() -> str:
    """A digest of what a built library is bound to besides its sources: it links libtorch and
    Python, whose ABI may change between torch releases without any error at load time."""
    import torch

    key = f"torch {torch.__version__} cxx11abi {int(torch._C._GLIBCXX_USE_CXX11_ABI)} {sys.implementation.cache_tag}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def library_name() -> str:
    """The name of the library built from the sources at hand for this torch and Python."""
    return f"{PREFIX}{sources_hash()}_{build_tag()}"


def cache_root() -> Path:
    """$VIVIT_KERNELS_CACHE, else torch's extension cache (`cpp_extension.get_default_build_root()`)."""
    # Computed as that function does, without importing torch.utils.cpp_extension: its import logs
    # a CUDA_HOME warning on machines without CUDA, and loading a built library needs none of it.
    from torch import _appdirs

    return Path(
        os.environ.get("VIVIT_KERNELS_CACHE") or os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions"))
    )


def find(roots: list[Path] | None = None) -> Path | None:
    """The library of the sources at hand in the package or the cache (or `roots`), if built."""
    if not have_sources():
        shipped = sorted(PACKAGE_BUILD.glob(f"{PREFIX}*_{build_tag()}/{PREFIX}*.so"))
        return shipped[0] if shipped else None
    name = library_name()
    for root in roots if roots is not None else [PACKAGE_BUILD, cache_root()]:
        path = Path(root) / name / f"{name}.so"
        if path.is_file():
            return path
    return None


def _cannot_build() -> str | None:
    if not have_sources():
        import torch

        if any(PACKAGE_BUILD.glob(f"{PREFIX}*/{PREFIX}*.so")):
            return (
                f"the installed library was built for another torch or Python than this one (torch "
                f"{torch.__version__}, {sys.implementation.cache_tag}); reinstall vivit-kernels for it"
            )
        return f"the C++ sources are not installed (expected {CSRC}); reinstall vivit-kernels from source"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found): install g++ (e.g. `apt install g++`) or set CXX"
    # What cpp_extension.is_ninja_available asks, without importing cpp_extension (its import logs
    # a CUDA_HOME warning on machines without CUDA, on top of the reason given here).
    if shutil.which("ninja") is None:
        return "ninja is not installed: `pip install ninja`"
    return None


def build(build_root: str | os.PathLike | None = None) -> Path:
    """Compile the sources into `build_root` (default: the cache) and load the library; returns its path.

    ninja reuses an up-to-date build in the same directory, so building twice costs nothing.
    """
    from torch.utils import cpp_extension

    reason = _cannot_build()
    if reason:
        raise RuntimeError(reason)
    name = library_name()
    directory = Path(build_root or cache_root()) / name
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


def load(build_root: str | os.PathLike | None = None) -> str:
    """Load the library once per process; returns its path. Raises RuntimeError saying why not.

    `build_root`: look for (and build) the library there only, instead of the package and the cache.
    """
    global _loaded, _error
    if _loaded:
        return _loaded
    if _error:
        raise RuntimeError(_error)
    import torch

    try:
        path = find([Path(build_root)] if build_root is not None else None)
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
