"""The C++ kernels' build path: compiled on first use into a fresh cache directory, then loaded."""

import os
import subprocess
import sys
import textwrap

import pytest

from vivit_kernels import _extension

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from vivit_kernels import _extension, reference
    from vivit_kernels.backends import cpu

    path = _extension.load(use_prebuilt=False, build_root=sys.argv[1])
    assert path.startswith(sys.argv[1]), path
    q, k, v = torch.randn(3, 1, 4, 6 * 5, 8, dtype=torch.float64).unbind(0)
    out = cpu.attention(q, k, v, 6, "split")
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
