"""The C++ kernels' loader (vivit_kernels/_extension.py): one rule, a library named by the hash
of its sources, found in the package or the cache or built on first use."""

import os
import subprocess
import sys
import textwrap

import pytest

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
    assert directory.name == f"vivit_kernels_csrc_{_extension.sources_hash()}"


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
