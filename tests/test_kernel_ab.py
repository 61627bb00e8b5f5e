"""tools/kernel_ab.py, the in-process comparison of two versions of the short-group kernels: its
program still compiles against the kernels' header (a field of ShortGroup renamed or dropped
fails here, not at the next kernel change), and a user's mistake is one line and exit status 2.
Building both sides and measuring (about a minute) is left to the tool's own runs."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kernel_ab", ROOT / "tools" / "kernel_ab.py")
kernel_ab = importlib.util.module_from_spec(_spec)
sys.modules["kernel_ab"] = kernel_ab
_spec.loader.exec_module(kernel_ab)


@pytest.mark.parametrize("part", ["-DKERNEL_AB_SIDE=a", "-DKERNEL_AB_MAIN"])
def test_program_compiles_against_the_kernels_header(part):
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (c++) on PATH: the tool builds the kernels with it")
    includes, _ = kernel_ab.torch_paths()
    command = [
        compiler,
        *kernel_ab.CFLAGS,
        *includes,
        f"-I{ROOT / 'csrc'}",
        "-Dvivit_kernels=vivit_kernels_a",
        part,
        "-fsyntax-only",
        str(kernel_ab.DRIVER),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_an_unknown_base_is_one_line_naming_it(capsys):
    assert kernel_ab.main(["--base", "no-such-revision", "--allow-loaded"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'no-such-revision'" in error and "HEAD~1" in error


@pytest.mark.parametrize("flag, value", [("--frames", "0"), ("--frames", "8,x"), ("--frames", "40"), ("--rounds", "0")])
def test_bad_numbers_are_refused_before_anything_is_built(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kernel_ab.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"'{value}'" in capsys.readouterr().err


def test_the_table_gives_b_over_a_of_forward_plus_backward():
    rows = [{"frames": 8, "a": (1.0, 3.0), "b": (1.0, 2.0), "out_difference": 0.0, "grad_difference": 1e-7}]
    line = kernel_ab.table(rows, "HEAD").splitlines()[-1]
    assert line.startswith("| 8 | 1.000 | 3.000 | 1.000 | 2.000 | 0.750 |"), line
    assert line.endswith("| 0, 1e-07 |"), line
