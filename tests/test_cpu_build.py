"""The C++ kernels' loader (vivit_kernels/_extension.py): one rule, a library named by the hash
of its sources, found in the package or the cache or built on first use."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vivit_kernels import _extension

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from vivit_kernels import _extension, factorised_attention, reference

    path = _extension.load(build_root=sys.argv[1])
    assert path.startswith(sys.argv[1]), path
    q, k, v = torch.randn(3, 1, 4, 6 * 5, 8, dtype=torch.float64).unbind(0)
    out = factorised_attention(q, k, v, 6, "split", backend="cpu")
    torch.testing.assert_close(out, reference.factorised_attention(q, k, v, 6, "split"), rtol=1e-12, atol=1e-12)
    print("loaded", path)
    """
)


@pytest.mark.skipif(_extension._cannot_build() is not None, reason=f"cannot compile here: {_extension._cannot_build()}")
def test_builds_and_loads_from_a_fresh_cache_directory(tmp_path):
    # A fresh process: a library registers its ops once per process, and this one may hold one already.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiling the C++ CPU kernels into" in result.stderr  # the one-line notice
    assert f"loaded {tmp_path}" in result.stdout
    (directory,) = tmp_path.iterdir()
    assert directory.name == f"vivit_kernels_csrc_{_extension.sources_hash()}_{_extension.build_tag()}"


def test_only_the_library_of_the_sources_at_hand_is_found(tmp_path, monkeypatch):
    """A library built from other sources (another hash) is never picked up, wherever it lies."""
    stale = tmp_path / f"{_extension.PREFIX}0123456789abcdef"
    stale.mkdir()
    (stale / f"{stale.name}.so").write_bytes(b"not a library")
    assert _extension.find([tmp_path]) is None
    current = tmp_path / _extension.library_name()
    current.mkdir()
    (current / f"{current.name}.so").write_bytes(b"")
    assert _extension.find([tmp_path]) == current / f"{current.name}.so"
    # Edit a source: the name changes, and the library just found is stale.
    monkeypatch.setattr(_extension, "CFLAGS", _extension.CFLAGS + ("-DEDITED",))
    assert _extension.find([tmp_path]) is None


def test_a_library_built_for_another_torch_is_never_found(tmp_path, monkeypatch):
    """The same sources built against another torch (its ABI may differ, and loading says nothing) are stale."""
    current = tmp_path / _extension.library_name()
    current.mkdir()
    (current / f"{current.name}.so").write_bytes(b"")
    assert _extension.find([tmp_path]) == current / f"{current.name}.so"
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    assert _extension.library_name() != current.name
    assert _extension.find([tmp_path]) is None


# Loads what is built (the package's library, else the cache's) and runs an op on it.
LOAD_BUILT = textwrap.dedent(
    """
    import sys, torch
    from vivit_kernels import _extension, factorised_attention, reference

    assert _extension.find() is not None
    _extension.load()
    q, k, v = torch.randn(3, 1, 4, 6 * 5, 8, dtype=torch.float64).unbind(0)
    out = factorised_attention(q, k, v, 6, "split", backend="cpu")
    torch.testing.assert_close(out, reference.factorised_attention(q, k, v, 6, "split"), rtol=1e-12, atol=1e-12)
    assert "torch.utils.cpp_extension" not in sys.modules, "a built library was loaded with the build tools imported"
    print("loaded")
    """
)


def test_a_built_library_loads_without_the_build_tools(tmp_path):
    """torch.utils.cpp_extension is for building: importing it logs "No CUDA runtime is found, using
    CUDA_HOME=..." on a machine without CUDA, a line no user of the CPU kernels asked for."""
    env = {**os.environ, "VIVIT_KERNELS_CACHE": str(tmp_path)}
    if _extension.find([_extension.PACKAGE_BUILD]) is None:  # not built at install: build it first
        if _extension._cannot_build():
            pytest.skip(f"not built, and cannot compile here: {_extension._cannot_build()}")
        build = "from vivit_kernels import _extension; _extension.build()"
        subprocess.run([sys.executable, "-c", build], env=env, check=True, capture_output=True, timeout=600)
    result = subprocess.run([sys.executable, "-c", LOAD_BUILT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "loaded"
    assert "CUDA_HOME" not in result.stderr and "cpp_extension" not in result.stderr, result.stderr


def test_the_cache_is_torchs_extension_cache(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delenv("VIVIT_KERNELS_CACHE", raising=False)
    assert _extension.cache_root() == Path(cpp_extension.get_default_build_root())
    monkeypatch.setenv("VIVIT_KERNELS_CACHE", str(tmp_path))
    assert _extension.cache_root() == tmp_path
