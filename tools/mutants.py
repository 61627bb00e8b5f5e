"""`make mutate`: mutation testing, two parts, one report (report.json and report.md).

Parts, in this order (`--parts` picks some):
  kernels  hand-written mutants of the C++ (csrc/) and Triton (vivit_kernels/triton/) kernels
           and their index maps (vivit_kernels/index_map.py), listed in MUTANTS below: plausible
           bugs in the index maps, the scaling and the layouts and strides (prefix handling, a
           missing mask, an off-by-one in a group length, v read with k's strides, a log-sum-exp
           or delta mistake). Each is anchored on a marker comment in the source, `# mutant: <id>`
           (Python) or `// mutant: <id>` (C++), at the end of the line it changes or alone on
           the line before, so that editing the code elsewhere does not move it. Each is applied to a
           scratch copy of the tree, never to the checkout; for a C++ mutant only the changed
           file is recompiled and linked with the unchanged objects into the library named
           after the mutated sources (vivit_kernels/_extension.py loads that one). Then the
           test files that cover that kernel run with -x, the Triton ones interpreted
           (TRITON_INTERPRET=1), smallest cases first. A mutant is killed when a test fails that
           passes unmutated (checked once per test), when the run crashes (an out-of-bounds
           access) or times out.
  python   mutmut on the Python packages. mutmut names a mutant after its file's path, so the
           tree is staged as the packages import (vivit_kernels/, models/vivit as vivit/, with
           tests/ and csrc/) and mutmut runs there with the [mutmut] section of setup.cfg.
           `--modules` scopes the run: "core" (the default) is the modules whose mutants must
           die (checks, the ops, the reference backend, the model, its layers, the checkpoint),
           "all" every module of both packages, or a comma-separated list of paths as in this
           repository (vivit_kernels/checks.py,models/vivit/model.py). Decorated functions (the
           Triton kernels and launchers) are not mutated by mutmut: the kernels part covers them.
           Nor are the functions that declare the ops at import (IMPORT_TIME): they run before
           any mutant is active, so their mutants would survive whatever the tests do.
           `--sample N` runs N random mutants per module (seeded) where the whole set would
           take too long.

Every hand-written mutant is in a must-kill category (index math, scaling, layouts): the exit
status is 1 when one survives or cannot be run (its marker or its line changed: "stale"; it does not compile;
pytest errors), or when mutmut fails or its score over what it ran is under --fail-under. The
report lists every survivor with its file, line and change.

    python tools/mutants.py [--parts kernels,python] [--modules core] [--sample N] [--only ID,...]
                            [--rev REV] [--out runs/mutate]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("kernels", "python")
CATEGORIES = ("index math", "scaling", "layouts")  # every one must-kill

# Test selections. Each kernel's own test file; the slow compile inspections left out (they
# compile for sm_80/sm_90 and check registers, not values).
# The interpreted kernels are slow, so the smallest cases run first (pytest keeps the order of the
# ids it is given, and -x stops at the first failure); the fp16/bf16 and head-dim sweeps (the same
# index maps at other tile widths) and the registration tests (no kernel runs) are left out.
TRITON_ATTENTION = tuple(
    f"tests/test_triton_attention.py::test_{name}"
    for name in (
        "prefix_tokens_and_layouts_match_oracle",
        "kernels_write_every_output_element",
        "group_length_extremes",
        "inputs_and_output_gradient_in_layouts_of_their_own",
        "backward_writes_gradients_into_any_layout",
        "fp32_forward_and_gradients_match_float64",
        "large_logits_do_not_overflow",
        "output_is_a_view_of_the_projection_layout",
    )
)
TRITON_ATTENTION_SELECT = None
TRITON_TUBELET = ("tests/test_triton_tubelet.py",)
TRITON_TUBELET_SELECT = "not inspection and not compile_for and not low_precision"
CPU_ATTENTION = tuple(
    f"tests/test_cpu_backend.py::test_{name}"
    for name in (
        "prefix_tokens_and_layouts_match_oracle",
        "spatial_groups_with_prefix_gathered_or_in_blocks",
        "inputs_and_output_gradient_in_layouts_of_their_own",
        "long_groups_in_layouts_of_their_own",
        "attention_matches_oracle",
        "attention_nan_stays_in_its_groups",
        "attention_gradcheck",
        "saved_for_backward",
    )
) + ("tests/test_cpu_short_groups.py",)
CPU_ATTENTION_SELECT = None
CPU_TUBELET = ("tests/test_cpu_backend.py", "tests/test_tubelet.py")
CPU_TUBELET_SELECT = "tubelet"  # -k matches module names too: all of test_tubelet.py


@dataclass(frozen=True)
class Mutant:
    """One plausible bug: `old` replaced by `new` on the line of `path` that its marker comment
    anchors (`old` occurs once in that line's code)."""

    id: str
    category: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    select: str | None = None


MUTANTS = [
    # --- Triton attention (vivit_kernels/triton/attention.py, vivit_kernels/index_map.py) -------
    Mutant(
        "tri-prefix-member",
        "index math",
        "a prefix group's members indexed without skipping the X prefix rows",
        "vivit_kernels/triton/attention.py",
        "(i - X) * MS",
        "i * MS",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-base",
        "index math",
        "the grid's base (P prefix tokens) dropped from the token map",
        "vivit_kernels/triton/attention.py",
        "BASE + g * GS",
        "g * GS",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-mask",
        "index math",
        "the forward's block-diagonal mask between packed groups missing",
        "vivit_kernels/triton/attention.py",
        "col_ok[None, :] & (row_group[:, None] == (cols // RL)[None, :])",
        "col_ok[None, :]",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-grid",
        "index math",
        "the grid's blocks per pack rounded down instead of up",
        "vivit_kernels/triton/attention.py",
        "triton.cdiv(min(groups_per_pack, groups) * row_length, block)",
        "(min(groups_per_pack, groups) * row_length) // block",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-pack-len",
        "index math",
        "the last pack's length off by one row",
        "vivit_kernels/triton/attention.py",
        "* RL",
        "* RL - 1",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-space-major",
        "layouts",
        "space-major spatial groups with the time-major member stride",
        "vivit_kernels/index_map.py",
        "cls(T, S, 1, T, P, P)",
        "cls(T, S, 1, S, P, P)",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-v-strides",
        "layouts",
        "the forward reads v with k's strides",
        "vivit_kernels/triton/attention.py",
        "*vh.stride(),",
        "*kh.stride(),",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-dout-strides",
        "layouts",
        "the backward reads dO with out's strides",
        "vivit_kernels/triton/attention.py",
        "*gh.stride()",
        "*_heads(out, h0, heads).stride()",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-log2e",
        "scaling",
        "the forward's logit scale without log2(e) (exp2 used as exp)",
        "vivit_kernels/triton/attention.py",
        "scale * LOG2E,",
        "scale,",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-dk-scale",
        "scaling",
        "dK not multiplied by the scale",
        "vivit_kernels/triton/attention.py",
        "*= scale",
        "*= 1.0",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-lse-base",
        "scaling",
        "the log-sum-exp saved in base 2, not natural log",
        "vivit_kernels/triton/attention.py",
        "(m_i + tl.log2(l_i)) / LOG2E_CONST",
        "m_i + tl.log2(l_i)",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-delta",
        "scaling",
        "delta = rowsum(O * O) instead of rowsum(dO * O)",
        "vivit_kernels/triton/attention.py",
        "* do.to(tl.float32)",
        "* o.to(tl.float32)",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-prefix-share",
        "scaling",
        "a spatial prefix row's gradient not divided among its T groups",
        "vivit_kernels/triton/attention.py",
        "1.0 / G_A, 1.0",
        "1.0, 1.0",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    Mutant(
        "tri-prefix-mean",
        "index math",
        "the averaged prefix output summed over the frames, not averaged",
        "vivit_kernels/triton/attention.py",
        ".mean(2)",
        ".sum(2)",
        TRITON_ATTENTION,
        TRITON_ATTENTION_SELECT,
    ),
    # --- Triton tubelet (vivit_kernels/triton/tubelet.py): no markers there yet ----------------
    Mutant(
        "tri-tube-corner",
        "index math",
        "a token's tube corner without the tubelet's time extent",
        "vivit_kernels/triton/tubelet.py",
        "return i * t * stride_t + j * h * stride_h + l * w * stride_w",
        "return i * stride_t + j * h * stride_h + l * w * stride_w",
        TRITON_TUBELET,
        TRITON_TUBELET_SELECT,
    ),
    Mutant(
        "tri-tube-w-stride",
        "layouts",
        "the video's W axis assumed unit-stride inside a tube",
        "vivit_kernels/triton/tubelet.py",
        "return c * stride_c + dt * stride_t + dh * stride_h + dw * stride_w",
        "return c * stride_c + dt * stride_t + dh * stride_h + dw",
        TRITON_TUBELET,
        TRITON_TUBELET_SELECT,
    ),
    Mutant(
        "tri-tube-split",
        "index math",
        "d(weight)'s token chunks rounded down: the last tiles never summed",
        "vivit_kernels/triton/tubelet.py",
        "chunk = tl.cdiv(tiles, SPLIT)",
        "chunk = tiles // SPLIT",
        TRITON_TUBELET,
        TRITON_TUBELET_SELECT,
    ),
    # --- C++ attention (csrc/attention.cpp, csrc/block_math.cpp) ------------------------------
    Mutant(
        "cpp-space-major",
        "layouts",
        "space-major spatial groups with the time-major strides",
        "csrc/attention.cpp",
        "IndexMap{T, S, 1, T, P, P}",
        "IndexMap{T, S, S, 1, P, P}",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-v-strides",
        "layouts",
        "the forward reads v's blocks with k's token stride",
        "csrc/attention.cpp",
        "keys.step * v.sn",
        "keys.step * k.sn",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-prefix-group",
        "index math",
        "a temporal head's prefix group one token short",
        "csrc/attention.cpp",
        "{1, P, 0, 1, 0, 0}",
        "{1, P - 1, 0, 1, 0, 0}",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-prefix-mean",
        "index math",
        "the averaged prefix output not divided by the T groups",
        "csrc/attention.cpp",
        "for (int64_t d = 0; d < Dh; ++d) o[d] /= T(geo.G);",
        "",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-ds-scale",
        "scaling",
        "the logits' gradient (into dK and dQ) not multiplied by the scale",
        "csrc/block_math.cpp",
        "(dv - *reinterpret_cast<const f32x8*>(delta + i)) * scale;",
        "(dv - *reinterpret_cast<const f32x8*>(delta + i));",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-lse",
        "scaling",
        "the log-sum-exp without the running max",
        "csrc/attention.cpp",
        "= row_max[i] + std::log(row_sum[i]);",
        "= std::log(row_sum[i]);",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-prefix-delta",
        "scaling",
        "a spatial prefix row's delta taken against the averaged output",
        "csrc/attention.cpp",
        "prefix_queries ? prefix_out.at(b, h, g, n) : out.row(b, h, n)",
        "out.row(b, h, n)",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-gathered-share",
        "scaling",
        "a gathered spatial group's prefix queries given the whole output gradient, not 1/T of it",
        "csrc/attention.cpp",
        "dO[d] = prefix_row ? dout_row[d] / T(geo.G) : dout_row[d];",
        "dO[d] = dout_row[d];",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-exp-scale",
        "scaling",
        "the float exponentials of long groups without the logit scale",
        "csrc/block_math.cpp",
        "v * scale - shift",
        "v - shift",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-short-scale",
        "scaling",
        "a short group's backward probabilities without the logit scale",
        "csrc/block_math.cpp",
        "Lp, scale, g.k",
        "Lp, T(1), g.k",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-paired-halves",
        "index math",
        "scores of groups of at most 8 without the odd elements of the head dim (AVX-512 CPUs)",
        "csrc/block_math.cpp",
        "alpha * (even + odd)",
        "alpha * (even + even)",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-wide-transpose",
        "index math",
        "16-float transposes without their 8-apart step (short groups on AVX-512 CPUs)",
        "csrc/block_math.cpp",
        "W == 16",
        "W == 0",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    Mutant(
        "cpp-autograd-order",
        "layouts",
        "the q, k, v form's gradients handed back as (dq, dv, dk)",
        "csrc/autograd.cpp",
        "{dq, dk, dv, at::Tensor()}",
        "{dq, dv, dk, at::Tensor()}",
        CPU_ATTENTION,
        CPU_ATTENTION_SELECT,
    ),
    # --- C++ tubelet (csrc/tubelet.cpp) ---------------------------------------------------------
    Mutant(
        "cpp-tube-corner",
        "index math",
        "a tube's corner without the tubelet's width",
        "csrc/tubelet.cpp",
        "iw * w * stride[4]",
        "iw * stride[4]",
        CPU_TUBELET,
        CPU_TUBELET_SELECT,
    ),
    Mutant(
        "cpp-tube-row-start",
        "index math",
        "a block that starts mid-row of tubes gathered from the row's first tube",
        "csrc/tubelet.cpp",
        "std::max(r0, tube_row * nw)",
        "tube_row * nw",
        CPU_TUBELET,
        CPU_TUBELET_SELECT,
    ),
    Mutant(
        "cpp-tube-accumulate",
        "index math",
        "d(weight) overwritten by each block of tubes instead of summed",
        "csrc/tubelet.cpp",
        "dW.add_(part);",
        "dW.copy_(part);",
        CPU_TUBELET,
        CPU_TUBELET_SELECT,
    ),
    Mutant(
        "cpp-tube-bias",
        "layouts",
        "oneDNN's product handed no bias, so float tokens come out without it",
        "csrc/tubelet.cpp",
        "bias.defined() ? c10::IValue(bias) : c10::IValue()",
        "c10::IValue()",
        CPU_TUBELET,
        CPU_TUBELET_SELECT,
    ),
]

# The modules whose mutmut mutants must die (issue: index math, scaling and layouts of the kernels'
# Python side, the models' structure, the checkpoint/resume path).
CORE_MODULES = (
    "vivit_kernels/checks.py",
    "vivit_kernels/ops/attention.py",
    "vivit_kernels/ops/tubelet.py",
    "vivit_kernels/ops/library.py",
    "vivit_kernels/backends/reference.py",
    "models/vivit/checkpoint.py",
    "models/vivit/model.py",
    "models/vivit/layers.py",
)
# Functions that run once, at import, before any mutant is active: they declare the ops to
# torch.library (with the autograd closures inside), so mutmut cannot activate their mutants,
# which would count as survivors whatever the tests do. test_ops.py's opcheck checks what they
# register; the kernels' gradient tests check the autograd formulas.
IMPORT_TIME = (
    "vivit_kernels.ops.library.x_define",
    "vivit_kernels.ops.library.x_register_autograd",
    "vivit_kernels.ops.library.x_register_autocast",
    "vivit_kernels.ops.attention.x_define_attention_ops",
    "vivit_kernels.ops.attention.x_packed_from",  # binds each backend's packed form when the backend is imported
    "vivit_kernels.ops.tubelet.x_define_tubelet_ops",
)
STATUS_KILLED = ("killed", "timeout", "segfault")  # mutmut's statuses that count as detected


# ---------------------------------------------------------------------------------------------
# The scratch tree.


def log(message: str) -> None:
    print(f"[mutate {time.strftime('%H:%M:%S')}] {message}", flush=True)


def copy_tree(dest: Path, rev: str | None) -> None:
    """The repository's files into `dest`: the commit `rev`, or the working tree (tracked and
    untracked files that git does not ignore) when None."""
    dest.mkdir(parents=True, exist_ok=True)
    if rev:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def test_env(tree: Path, cache: Path, triton: bool) -> dict[str, str]:
    """The environment of a test run in `tree`: its packages first on the path (ahead of the
    editable install's finder), its C++ library cache, and the Triton interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "models")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a mutated file and its restored original may share an mtime
    env["VIVIT_KERNELS_CACHE"] = str(cache)
    if triton:
        env["TRITON_INTERPRET"] = "1"
    return env


def load_extension_module(tree: Path):
    """`tree`'s vivit_kernels/_extension.py, loaded on its own (no torch import), as setup.py does."""
    spec = importlib.util.spec_from_file_location(
        f"_mutate_extension_{id(tree)}", tree / "vivit_kernels" / "_extension.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Library:
    """The C++ library of the scratch tree: the unmutated build (objects kept), and one library per
    C++ mutant, built by recompiling the mutated file only."""

    def __init__(self, tree: Path, cache: Path):
        self.tree, self.cache = tree, cache
        self.extension = load_extension_module(tree)
        self.baseline = self.cache / self.extension.library_name()

    def prepare(self) -> None:
        """The unmutated build in the cache, copied from the checkout's build when it has the
        objects of these sources, else compiled."""
        name = self.extension.library_name()
        if (self.baseline / f"{name}.so").is_file():
            return
        for root in (ROOT / "vivit_kernels" / "_csrc", self.extension.cache_root()):
            built = root / name
            if (built / f"{name}.so").is_file() and all(
                (built / f"{Path(s).stem}.o").is_file() for s in self.extension.SOURCES
            ):
                shutil.copytree(built, self.baseline, dirs_exist_ok=True)
                log(f"C++ library {name}: reusing the build in {root}")
                return
        log(f"C++ library {name}: compiling the unmutated sources")
        env = {**os.environ, "VIVIT_KERNELS_CACHE": str(self.cache)}
        code = (
            f"import importlib.util as u; s = u.spec_from_file_location('e', {str(self.tree / 'vivit_kernels' / '_extension.py')!r}); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.build()"
        )
        subprocess.run([sys.executable, "-c", code], env=env, check=True)

    def _flags(self) -> tuple[list[str], list[str]]:
        ninja = (self.baseline / "build.ninja").read_text()

        def line(key: str) -> list[str]:
            match = re.search(rf"^{key} = (.*)$", ninja, re.MULTILINE)
            return shlex.split(match.group(1)) if match else []

        return line("cflags"), line("ldflags")

    def build_mutant(self, changed: str) -> tuple[bool, str]:
        """Build the library of the (mutated) sources now in the tree, recompiling `changed`
        (csrc/<file>.cpp) only. Returns (built, compiler output)."""
        name = self.extension.library_name()
        directory = self.cache / name
        directory.mkdir(parents=True, exist_ok=True)
        cflags, ldflags = self._flags()
        compiler = os.environ.get("CXX", "c++")
        stem = Path(changed).stem
        obj = directory / f"{stem}.o"
        compile_cmd = [compiler, *cflags, "-c", str(self.tree / changed), "-o", str(obj)]
        result = subprocess.run(compile_cmd, capture_output=True, text=True)
        if result.returncode:
            return False, result.stdout + result.stderr
        objects = [obj if Path(s).stem == stem else self.baseline / f"{Path(s).stem}.o" for s in self.extension.SOURCES]
        result = subprocess.run(
            [compiler, *map(str, objects), *ldflags, "-o", str(directory / f"{name}.so")],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0, result.stdout + result.stderr

    def discard(self) -> None:
        """Remove every mutant's library, keep the unmutated one."""
        for path in self.cache.iterdir():
            if path.is_dir() and path != self.baseline:
                shutil.rmtree(path, ignore_errors=True)


def present(tree: Path, tests: tuple[str, ...]) -> tuple[str, ...]:
    """`tests` less the test functions (file::name ids) that the tree's test files do not define."""

    def defined(test: str) -> bool:
        file, _, name = test.partition("::")
        return not name or f"def {name.split('[')[0]}(" in (tree / file).read_text()

    return tuple(filter(defined, tests))


def run_pytest(
    tree: Path, env: dict, files: tuple[str, ...], select: str | None, timeout: float
) -> tuple[int | None, float, str]:
    """(exit status or None on timeout, seconds, last lines of output) of pytest -x on `files`."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=line", *files]
    if select:
        cmd += ["-k", select]
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (
            (expired.stdout or b"").decode(errors="replace")
            if isinstance(expired.stdout, bytes)
            else (expired.stdout or "")
        )
        return None, time.monotonic() - start, output[-2000:]
    output = result.stdout + result.stderr
    return result.returncode, time.monotonic() - start, output[-2000:]


def _first_failure(output: str) -> str:
    """The first failing test's id, from pytest -q --tb=line output."""
    match = re.search(r"^FAILED (\S+)", output, re.MULTILINE) or re.search(r"^ERROR (\S+)", output, re.MULTILINE)
    return match.group(1) if match else ""


def comment_of(path: str) -> str:
    """The line-comment token of a source file: `//` for C++, `#` for Python."""
    return "//" if Path(path).suffix in (".cpp", ".h", ".cc", ".hpp") else "#"


def marker(mutant: Mutant) -> str:
    return f"{comment_of(mutant.path)} mutant: {mutant.id}"


def markers_in(text: str, comment: str) -> list[str]:
    """The ids of the mutant markers in a source text, one per marker, in order."""
    return re.findall(rf"{re.escape(comment)} mutant: ([\w-]+)", text)


def locate(text: str, mutant: Mutant) -> tuple[int, int]:
    """(start, end) offsets of `old` in `text`: on the line that the mutant's marker ends, or on
    the line after a marker that stands alone. Raises ValueError when the marker is not there
    exactly once or `old` is not once in its line's code (the mutant must be updated)."""
    tag, comment = marker(mutant), comment_of(mutant.path)
    lines = text.splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if mutant.id in markers_in(line, comment)]
    if len(found) != 1:
        raise ValueError(f"{mutant.path}: expected one marker {tag!r}, found {len(found)}")
    i = found[0]
    code = lines[i][: lines[i].index(tag)]
    if not code.strip():  # the marker stands alone: it anchors the next line
        i += 1
        code = lines[i] if i < len(lines) else ""
        if comment in code:
            code = code[: code.index(comment)]
    count = code.count(mutant.old)
    if count != 1:
        raise ValueError(
            f"{mutant.path}:{i + 1}: expected one occurrence of {mutant.old!r} on the line {tag!r} marks, found {count}"
        )
    at = sum(map(len, lines[:i])) + code.index(mutant.old)
    return at, at + len(mutant.old)


def apply(tree: Path, mutant: Mutant) -> str:
    """Write `mutant` into `tree`; returns the original text of the file. Raises ValueError when
    the code it targets has changed (the mutant must be updated)."""
    path = tree / mutant.path
    text = path.read_text()
    start, end = locate(text, mutant)
    path.write_text(text[:start] + mutant.new + text[end:])
    return text


def line_of(text: str, mutant: Mutant) -> int:
    return text.count("\n", 0, locate(text, mutant)[0]) + 1


def run_kernel_mutants(work: Path, rev: str | None, only: set[str] | None, timeout: float) -> dict:
    tree = work / "kernels"
    if tree.exists():
        shutil.rmtree(tree)
    copy_tree(tree, rev)
    cache = work / "csrc-cache"
    cache.mkdir(parents=True, exist_ok=True)
    library = Library(tree, cache)
    library.prepare()
    mutants = [m for m in MUTANTS if only is None or m.id in only]

    # A kill counts when the test that failed passes unmutated (checked once per test).
    passes_unmutated: dict[str, bool] = {}

    def passes(test: str, triton: bool) -> bool:
        if test not in passes_unmutated:
            status, _, output = run_pytest(tree, test_env(tree, cache, triton), (test,), None, timeout)
            passes_unmutated[test] = status == 0
            if status != 0:
                log(f"  {test} fails unmutated:\n{output[-1500:]}")
        return passes_unmutated[test]

    results = []
    for mutant in mutants:
        entry = {**asdict(mutant), "tests": list(mutant.tests)}
        try:
            original = apply(tree, mutant)
        except ValueError as error:
            results.append({**entry, "status": "stale", "detail": str(error)})
            log(f"{mutant.id}: stale ({error})")
            continue
        entry["line"] = line_of(original, mutant)
        try:
            if mutant.path.startswith("csrc/"):
                built, output = library.build_mutant(mutant.path)
                if not built:
                    results.append({**entry, "status": "does not compile", "detail": output[-1500:]})
                    log(f"{mutant.id}: does not compile")
                    continue
            triton = any("triton" in test for test in mutant.tests)
            status, seconds, output = run_pytest(
                tree, test_env(tree, cache, triton), present(tree, mutant.tests), mutant.select, timeout
            )
        finally:
            (tree / mutant.path).write_text(original)
            library.discard()
        if status is None:
            verdict, detail = "killed", f"timed out after {timeout:.0f} s"
        elif status == 1:
            verdict, detail = "killed", _first_failure(output)
            if not detail or not passes(detail, triton):
                verdict, detail = "error", f"{detail or 'a test'} fails unmutated too"
        elif status == 0:
            verdict, detail = "survived", ""
        elif status < 0:  # the mutant crashed the process (an out-of-bounds access, say)
            verdict, detail = "killed", f"crashed (signal {-status})"
        else:
            verdict, detail = "error", f"pytest exit status {status}: {output[-800:]}"
        results.append({**entry, "status": verdict, "detail": detail, "seconds": round(seconds, 1)})
        log(f"{mutant.id}: {verdict} in {seconds:.0f} s {detail}")
    return {"mutants": results, "checked_unmutated": passes_unmutated}


# ---------------------------------------------------------------------------------------------
# mutmut on the Python packages.


def modules_of(spec: str) -> list[str]:
    """Repository paths of the modules to mutate: "core", "all" or a comma-separated list."""
    if spec == "core":
        return list(CORE_MODULES)
    if spec == "all":
        return sorted(
            str(p.relative_to(ROOT)) for root in ("vivit_kernels", "models/vivit") for p in (ROOT / root).rglob("*.py")
        )
    return [m.strip() for m in spec.split(",") if m.strip()]


def staged_path(path: str) -> str:
    """A repository path as it lies in the staged tree (models/vivit/x.py -> vivit/x.py)."""
    return path.removeprefix("models/")


def stage_python(work: Path, rev: str | None, modules: list[str]) -> Path:
    """The tree mutmut runs in: the packages where their import names say, setup.cfg's [mutmut]
    section with `only_mutate` set to `modules`."""
    checkout = work / "checkout"
    if checkout.exists():
        shutil.rmtree(checkout)
    copy_tree(checkout, rev)
    stage = work / "python"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    # The tests import benchmarks' shared helpers (relative_error).
    for source, target in (
        ("vivit_kernels", "vivit_kernels"),
        ("models/vivit", "vivit"),
        ("tests", "tests"),
        ("benchmarks", "benchmarks"),
        ("csrc", "csrc"),
    ):
        shutil.copytree(checkout / source, stage / target)
    # The C++ library of these sources, so that the tests do not compile it (mutmut copies the package).
    built = Library(checkout, work / "csrc-cache")
    built.prepare()
    name = built.extension.library_name()
    shutil.copytree(built.baseline, stage / "vivit_kernels" / "_csrc" / name, dirs_exist_ok=True)

    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")  # the tool's configuration, whatever revision is mutated
    if not config.has_section("mutmut"):
        raise SystemExit("setup.cfg has no [mutmut] section")
    config.set("mutmut", "only_mutate", "\n" + "\n".join(staged_path(m) for m in modules))
    with open(stage / "setup.cfg", "w") as f:
        f.write("[mutmut]\n")
        for key, value in config.items("mutmut"):
            f.write(f"{key} = {value.replace(chr(10), chr(10) + '    ')}\n")
    return stage


def mutmut_results(stage: Path, env: dict) -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=stage, env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"^\s+(\S+__mutmut_\d+): (.+?)\s*$", out, re.MULTILINE))


def describe(stage: Path, env: dict, name: str) -> dict:
    """A surviving mutant's file (as in the repository), line and change, from `mutmut show`."""
    diff = subprocess.run(
        [sys.executable, "-m", "mutmut", "show", name], cwd=stage, env=env, capture_output=True, text=True
    ).stdout
    path = re.search(r"^\+\+\+ (?:b/)?(\S+)", diff, re.MULTILINE)
    lines = diff.splitlines()
    removed = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    file = path.group(1) if path else ""
    if file.startswith("mutants/"):
        file = file.removeprefix("mutants/")
    if file.startswith("vivit/"):
        file = "models/" + file
    # mutmut's hunk numbers count from the function: find the changed line in the file instead.
    line = 0
    if removed and file:
        source = (stage / staged_path(file)).read_text().splitlines()
        line = next((i + 1 for i, text in enumerate(source) if text.strip() == removed[0]), 0)
    return {"name": name, "file": file, "line": line, "from": " | ".join(removed), "to": " | ".join(added)}


GENERATE = (
    "import os; from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants; "
    "os.makedirs('mutants', exist_ok=True); copy_src_dir(); copy_also_copy_files(); create_mutants(1)"
)


def generated_mutants(stage: Path, env: dict) -> dict[str, list[str]]:
    """Generate mutmut's mutants in `stage` without running anything; module path -> mutant names."""
    subprocess.run([sys.executable, "-c", GENERATE], cwd=stage, env=env, check=True, capture_output=True)
    names: dict[str, list[str]] = {}
    for meta in sorted((stage / "mutants").rglob("*.py.meta")):
        module = str(meta.relative_to(stage / "mutants"))[: -len(".meta")]
        keys = list(json.loads(meta.read_text())["exit_code_by_key"])
        if keys:
            names["models/" + module if module.startswith("vivit/") else module] = keys
    return names


def run_mutmut(work: Path, rev: str | None, modules: list[str], children: int, sample: int, seed: int) -> dict:
    stage = stage_python(work, rev, modules)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["VIVIT_KERNELS_CACHE"] = str(work / "csrc-cache")
    generated = generated_mutants(stage, env)
    skipped = sum(n.partition("__mutmut_")[0] in IMPORT_TIME for names in generated.values() for n in names)
    generated = {
        m: [n for n in names if n.partition("__mutmut_")[0] not in IMPORT_TIME] for m, names in generated.items()
    }
    chosen: list[str] = []
    rng = random.Random(seed)
    for names in generated.values():  # a sample of each module's: the same for the same seed and sources
        chosen += sorted(rng.sample(names, min(sample, len(names)))) if sample else names
    log(
        f"mutmut on {len(modules)} module(s), {sum(map(len, generated.values()))} mutants ({skipped} of import-time code left out)"
        + (f", {len(chosen)} sampled ({sample} per module, seed {seed})" if sample else "")
        + f": {', '.join(modules)}"
    )
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *chosen],
        cwd=stage,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - start
    (work / "mutmut.log").write_text(run.stdout + run.stderr)
    statuses = mutmut_results(stage, env)
    statuses = {name: status for name, status in statuses.items() if name in set(chosen)}
    log(
        f"mutmut: exit status {run.returncode} in {seconds:.0f} s, {len(statuses)} mutants (log: {work / 'mutmut.log'})"
    )
    per_module: dict[str, dict[str, int]] = {}
    survivors = []
    for name, status in statuses.items():
        module = (
            "models/" + name.split(".x")[0].replace(".", "/") + ".py"
            if name.startswith("vivit.")
            else name.split(".x")[0].replace(".", "/") + ".py"
        )
        counts = per_module.setdefault(module, {})
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            survivors.append(describe(stage, env, name))
    return {
        "modules": modules,
        "generated": {m: len(n) for m, n in generated.items()},
        "import_time_left_out": skipped,
        "sample": sample,
        "seed": seed,
        "exit_status": run.returncode,
        "seconds": round(seconds),
        "per_module": per_module,
        "survivors": survivors,
        "log_tail": (run.stdout + run.stderr)[-3000:],
    }


# ---------------------------------------------------------------------------------------------
# Report.


def score(killed: int, total: int) -> str:
    return f"{killed}/{total} ({100 * killed / total:.1f}%)" if total else "0/0"


def summarise(report: dict, fail_under: float) -> tuple[list[str], bool]:
    lines, ok = ["# Mutation testing", ""], True
    kernels = report.get("kernels")
    if kernels:
        ran = [m for m in kernels["mutants"] if m["status"] in ("killed", "survived")]
        killed = [m for m in ran if m["status"] == "killed"]
        lines += ["## Hand-written kernel mutants", "", f"Killed {score(len(killed), len(ran))}.", ""]
        for category in CATEGORIES:
            in_category = [m for m in ran if m["category"] == category]
            lines.append(f"- {category}: {score(sum(m['status'] == 'killed' for m in in_category), len(in_category))}")
        for kind, prefix in (("C++", "csrc/"), ("Triton", "vivit_kernels/")):
            of_kind = [m for m in ran if m["path"].startswith(prefix)]
            lines.append(f"- {kind}: {score(sum(m['status'] == 'killed' for m in of_kind), len(of_kind))}")
        lines += ["", "| mutant | category | where | status | detail |", "|---|---|---|---|---|"]
        for m in kernels["mutants"]:
            where = f"{m['path']}:{m.get('line', '?')}"
            lines.append(
                f"| {m['id']} | {m['category']} | {where} | {m['status']} | {m['what']}; {m['detail'][:120]} |"
            )
        if len(ran) != len(kernels["mutants"]) or len(killed) != len(ran):
            ok = False
        lines.append("")
    python = report.get("python")
    if python:
        totals = {}
        for counts in python["per_module"].values():
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        detected = sum(totals.get(s, 0) for s in STATUS_KILLED)
        tested = detected + totals.get("survived", 0)
        lines += [
            "## mutmut",
            "",
            f"Killed {score(detected, tested)} of the mutants with tests; statuses: {json.dumps(totals)}.",
            "",
            "| module | killed | survived | no tests | other |",
            "|---|---|---|---|---|",
        ]
        for module, counts in sorted(python["per_module"].items()):
            killed_here = sum(counts.get(s, 0) for s in STATUS_KILLED)
            other = sum(n for s, n in counts.items() if s not in (*STATUS_KILLED, "survived", "no tests"))
            lines.append(
                f"| {module} | {killed_here} | {counts.get('survived', 0)} | {counts.get('no tests', 0)} | {other} |"
            )
        lines += ["", "Survivors:", ""]
        for s in sorted(python["survivors"], key=lambda s: (s["file"], s["line"])):
            lines.append(f"- {s['file']}:{s['line']} `{s['from']}` -> `{s['to']}` ({s['name']})")
        if not tested or 100 * detected / tested < fail_under:
            ok = False
        if python["exit_status"] != 0:
            ok = False
        lines.append("")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from " + ", ".join(PARTS))
    parser.add_argument("--modules", default="core", help='mutmut\'s modules: "core", "all" or paths, comma-separated')
    parser.add_argument("--only", default="", help="hand-written mutants to run, by id, comma-separated (default: all)")
    parser.add_argument("--rev", default=None, help="mutate this commit instead of the working tree")
    parser.add_argument("--out", default=str(ROOT / "runs" / "mutate"), help="report directory")
    parser.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one test run of a kernel mutant")
    parser.add_argument("--children", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="mutmut's workers")
    parser.add_argument(
        "--sample", type=int, default=0, help="mutmut: run this many mutants per module, at random (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--fail-under", type=float, default=90.0, help="mutmut's minimum score, percent")
    parser.add_argument("--list", action="store_true", help="list the hand-written mutants and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:22} {m.category:11} {m.path}: {m.what}")
        return 0
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    only = {s for s in args.only.split(",") if s} or None
    if only and only - {m.id for m in MUTANTS}:
        parser.error(f"unknown mutant(s) {sorted(only - {m.id for m in MUTANTS})}; see --list")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vivit-mutate-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"scratch tree in {work}; report in {out}")

    report: dict = {"rev": args.rev or "working tree", "parts": parts}
    start = time.monotonic()
    if "kernels" in parts:
        t0 = time.monotonic()
        report["kernels"] = run_kernel_mutants(work, args.rev, only, args.timeout)
        report["kernels"]["seconds"] = round(time.monotonic() - t0)
    if "python" in parts:
        report["python"] = run_mutmut(work, args.rev, modules_of(args.modules), args.children, args.sample, args.seed)
    report["seconds"] = round(time.monotonic() - start)
    lines, ok = summarise(report, args.fail_under)
    lines.append(f"Ran in {report['seconds']} s.")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
