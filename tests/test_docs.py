"""Every code block in README.md and docs/ runs as written.

A ```python block runs in a fresh interpreter; a ```bash block runs under `bash -e`, with this
environment's scripts first on PATH. Both run in a scratch directory that holds what the examples
name: `clip.mp4` (a short H.264 video), `train.csv` (rows of `path,label`) and the repository's
README.md, benchmarks/, docs/ and tools/. Blocks of any other language (text, output, diagrams)
are not code.

A comment on the line after a block changes how it runs:
  <!-- docs-test: skip REASON -->   not run (a GPU, a download, the suite itself); the reason is the skip's
  <!-- docs-test: dry-run -->       a long job: each `make TARGET` line runs as `make -n TARGET`, each
                                    other command with `--help` (the command exists, its module imports)
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n(?:\n?<!-- docs-test: ([\w-]+)(?: ([^\n]*?))? -->)?", re.M | re.S)
RUN_LANGUAGES = {"python", "bash"}
TIMEOUT_S = 300


def blocks() -> list:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            language, code, directive, reason = match.groups()
            if language not in RUN_LANGUAGES:
                continue
            line = text.count("\n", 0, match.start()) + 1
            name = f"{page.relative_to(REPO)}:{line}"
            marks = [pytest.mark.skip(reason=reason)] if directive == "skip" else []
            found.append(pytest.param(language, code, directive, id=name, marks=marks))
    return found


def test_blocks_are_found():
    """The pattern above finds the fences a page has: a page's runnable blocks are not silently ignored."""
    for page in PAGES:
        text = page.read_text()
        fences = sum(1 for language in re.findall(r"^```(\w*)\n", text, re.M) if language in RUN_LANGUAGES)
        assert fences == sum(1 for m in FENCE.finditer(text) if m.group(1) in RUN_LANGUAGES), page
    assert len(blocks()) >= 10


def test_every_directive_is_known():
    for page in PAGES:
        for directive in re.findall(r"<!-- docs-test: (\S+)", page.read_text()):
            assert directive in ("skip", "dry-run"), f"{page.name}: unknown docs-test directive {directive!r}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory with the files the examples name."""
    av = pytest.importorskip("av", reason="PyAV (`pip install av`) writes the examples' clip.mp4")
    del av
    from support.videofiles import write_video

    directory = tmp_path_factory.mktemp("docs")
    write_video(directory / "clip.mp4", frames=40, width=64, height=48)
    (directory / "train.csv").write_text("clip.mp4,0\nclip.mp4,1\n")
    for name in ("README.md", "benchmarks", "docs", "tools"):  # commands are written as run from the root
        (directory / name).symlink_to(REPO / name)
    return directory


def environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def dry_run(code: str) -> str:
    """Each command line of `code` as a check that does not run the job."""
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "make":
            targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
            lines.append(shlex.join(["make", "-n", "-C", str(REPO), *targets]) + " >/dev/null")
        elif words[0] == "torchrun":
            module = words[words.index("-m") + 1]
            lines.append(shlex.join(["python", "-m", module, "--help"]) + " >/dev/null")
        elif words[:2] == ["python", "-m"]:
            lines.append(shlex.join(["python", "-m", words[2], "--help"]) + " >/dev/null")
        else:
            lines.append(shlex.join([words[0], "--help"]) + " >/dev/null")
    return "\n".join(lines)


@pytest.mark.parametrize("language, code, directive", blocks())
def test_block(language, code, directive, scratch):
    if language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", dry_run(code) if directive == "dry-run" else code]
    result = subprocess.run(command, cwd=scratch, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def test_make_demo(tmp_path):
    """The README's first command, on the environment this suite runs in (its .venv is not rebuilt)."""
    venv = Path(sys.prefix)
    stamp = venv / ".vivit-installed"
    if not stamp.exists():
        pytest.skip(f"{venv} was not set up by `make install` (no {stamp.name}); `make demo` would install into it")
    result = subprocess.run(
        ["make", "-o", str(stamp), "demo", f"VENV={venv}", f"DEMO_DIR={tmp_path / 'demo'}"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    accuracy = re.search(r"top-1 ([\d.]+)%", result.stdout)
    assert accuracy and float(accuracy.group(1)) > 90, result.stdout[-3000:]


def test_models_page_counts_are_the_summarys():
    """docs/models.md's parameter and GFLOP table is what `python -m vivit.summary` prints (they are
    counts, the same on every machine)."""
    from vivit.summary import table

    page = (REPO / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| (\d) [\w -]+ \| ([\d.]+) \| ([\d.]+) \|$", page, re.M)
    assert len(rows) == 4
    for (number, params, gflops), row in zip(rows, table("vivit_b")):
        assert (params, gflops) == (f"{row.params_m:.1f}", f"{row.gflops:.1f}"), f"model {number}"
