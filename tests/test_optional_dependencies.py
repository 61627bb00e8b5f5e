"""Without each optional dependency, the tests that need it skip with a reason naming it, and the
tools that can do without it say so in one line. Each check runs in a subprocess where the
dependencies are hidden, as on a machine that lacks them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# sitecustomize.py for the subprocess: the top-level modules in $VIVIT_HIDE_MODULES are not found
# (an import raises ModuleNotFoundError, importlib.util.find_spec gives None), as if not installed.
HIDE_MODULES = """
import os, sys

_HIDDEN = set(filter(None, os.environ.get("VIVIT_HIDE_MODULES", "").split(",")))


class _Hide:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN or not hasattr(self._finder, "find_spec"):
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
"""


def run_without(modules: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python ARGS` in the repository with `modules` hidden."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_MODULES)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "VIVIT_HIDE_MODULES": ",".join(modules)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def skip_reasons(output: str) -> dict[str, list[str]]:
    """pytest -rs's summary: test file -> the reasons of its skips."""
    reasons: dict[str, list[str]] = {}
    for path, reason in re.findall(r"^SKIPPED \[\d+\] ([^:\s]+):\d+: (.*)$", output, re.MULTILINE):
        reasons.setdefault(path, []).append(reason)
    return reasons


PYTEST = ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-disable"]

# (hidden modules, {test selection: the name its skip reason must hold}). Modules hidden together
# where each selection needs only one of them.
CASES = {
    "timm, transformers, vit_pytorch, av, matplotlib, triton": (
        ["timm", "transformers", "vit_pytorch", "av", "matplotlib", "triton"],
        {
            "tests/test_attention.py::test_module_stands_in_a_timm_block": "timm",
            "tests/test_hf_import.py": "transformers",
            "benchmarks/test_dropin.py::test_dropin[cpu-float32-vit_pytorch_factorized_encoder-original]": "vit_pytorch",
            "tests/test_data.py": "PyAV",
            "benchmarks/test_plots.py": "matplotlib",
            "tests/test_triton_common.py": "triton",
        },
    ),
    # transformers needs safetensors for its models, though its import succeeds without it.
    "safetensors, torchcodec": (
        ["safetensors", "torchcodec"],
        {
            "tests/test_init_from_image.py::test_factorised_encoder_frames_equal_image_features[safetensors]": "safetensors",
            "tests/test_hf_import.py": "safetensors",
            "benchmarks/test_loader.py::test_loader[10s-torchcodec]": "torchcodec",
        },
    ),
}


@pytest.mark.parametrize("modules, selections", CASES.values(), ids=CASES.keys())
def test_tests_needing_a_missing_dependency_skip_naming_it(modules, selections, tmp_path):
    result = run_without(modules, [*PYTEST, *selections], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r"^\d+ skipped", output, re.MULTILINE), output[-3000:]  # no test ran, none failed
    reasons = skip_reasons(output)
    for selection, name in selections.items():
        path = selection.split("::")[0]
        assert any(name in reason for reason in reasons.get(path, [])), (selection, name, reasons)


def test_training_without_tqdm_says_so_in_one_line(tmp_path):
    args = [
        "-m",
        "vivit.train",
        "--output-dir",
        str(tmp_path / "run"),
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--tubelet",
        "2",
        "8",
        "8",
        "--num-frames",
        "4",
        "--img-size",
        "16",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--synthetic-val-clips",
        "0",
    ]
    result = run_without(["tqdm"], args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "no progress bar: tqdm is not installed (pip install tqdm)\n" in result.stderr
