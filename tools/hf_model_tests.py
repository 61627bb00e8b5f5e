"""The model tests transformers and timm ship, run on the original models and on models converted by vivit_kernels.

Each family's test file runs twice under pytest, in a subprocess: as shipped, and with the family's
model classes converting themselves (`vivit_kernels.convert`) as a user converts: a model built by
its constructor when that returns, a model loaded by `from_pretrained` (or built by `_from_config`)
once loaded. The report lists, per family, the tests that pass unconverted, how many of those pass
converted, and why each of the others fails, classed as refused by design (what docs/dropin.md lists
as refused: attention weights, `output_attentions`; TorchScript of a converted attention) or not.
vit-pytorch ships no tests for its ViViT.

    python -m tools.hf_model_tests [--families vivit,videomae,timesformer,timm_vit] [--out runs/hf_model_tests]

What it needs, and where it finds it:
  - transformers: the common test modules (tests/test_modeling_common.py, test_configuration_common.py,
    test_pipeline_mixin.py, ...) from the source distribution of the installed version, taken from
    --cache, else downloaded there with `pip download --no-binary :all:` from the package index pip
    is configured with. The model test files (tests/models/<family>/test_modeling_<family>.py),
    which the distribution does not carry, come from --sources: a directory laid out as
    transformers' repository (a checkout of the installed version's tag will do). The support
    modules the distribution lacks as well (tests/exporters/test_export.py,
    tests/generation/test_utils.py, tests/utils/test_configuration_utils.py and
    tiny_model_summary.json) come from --sources when present there, else from the stand-ins in
    tools/hf_model_tests/standins/ (what each leaves out is in its docstring);
  - timm: tests/test_models.py from its source distribution (same --cache), run on the tiny
    VisionTransformer configurations test_vit..test_vit4, converted with mode="joint";
  - `parameterized`, which transformers' common tests import: from the environment, else installed
    into --out/deps with `pip install --target`.

Tests marked slow (hub checkpoints, integration, export) are skipped unless --slow; the hub is
offline (HF_HUB_OFFLINE=1), so tests that need a checkpoint fail both ways and are not counted. A
test that kills its process (a crash in a kernel) is recorded as crashed and the run goes on. Writes
--out/report.json and --out/report.md and prints the table; exit status 0 when every test that
passes unconverted passes converted or is refused by design.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "hf_model_tests"
PLUGIN = "hf_model_tests_plugin"


@dataclass(frozen=True)
class Family:
    name: str
    package: str  # the distribution whose tests run: "transformers" or "timm"
    module: str  # the module whose model classes are converted at construction
    test_file: str  # path in the package's repository
    classes: tuple[str, ...] = ()  # the model classes converted (default: every transformers model of `module`)
    options: tuple[tuple[str, str], ...] = ()  # convert's keyword arguments
    select: str | None = None  # the tests of the file that are the family's (pytest -k)


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "vivit",
            "transformers",
            "transformers.models.vivit.modeling_vivit",
            "tests/models/vivit/test_modeling_vivit.py",
        ),
        Family(
            "videomae",
            "transformers",
            "transformers.models.videomae.modeling_videomae",
            "tests/models/videomae/test_modeling_videomae.py",
        ),
        Family(
            "timesformer",
            "transformers",
            "transformers.models.timesformer.modeling_timesformer",
            "tests/models/timesformer/test_modeling_timesformer.py",
        ),
        # timm's model tests run over every registered model; its tiny test_vit* configurations are
        # the VisionTransformer ones (test_vit_relpos is another class). The pruning contract test
        # is left out for time (about a minute per model on 2 cores); conversion keeps blocks as they are.
        Family(
            "timm_vit",
            "timm",
            "timm.models.vision_transformer",
            "tests/test_models.py",
            classes=("VisionTransformer",),
            options=(("mode", "joint"),),
            select="test_vit and not test_vit_relpos and not test_prune_intermediate_layers_contract",
        ),
    )
}
# Modules transformers' common tests import that its source distribution does not carry.
SUPPORT_FILES = (
    "tests/exporters/test_export.py",
    "tests/generation/test_utils.py",
    "tests/utils/test_configuration_utils.py",
    "tests/utils/tiny_model_summary.json",
)
# A converted layer refusing attention weights, as the docs list it (vivit_kernels/convert/common.py: refuse_extras).
# With --memory lean, a block lean does not rewrite (another norm or MLP class: docs/dropin.md, "Lean memory").
REFUSED = re.compile(
    r"converted by vivit_kernels\).*output_attentions|never forms the attention matrix"
    r"|^ValueError: convert: \S+: memory='lean' (fuses|rewrites) "
)
# torch.jit.script stopping in vivit_kernels' code: a converted attention's forward is not scriptable (docs/dropin.md).
SCRIPTING = re.compile(r"torch\.jit\.frontend\.\w+Error")
OUTCOMES = ("passed", "failed", "error", "crashed", "skipped", "xfailed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_model_tests", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "hf_model_tests", help="report directory")
    parser.add_argument(
        "--cache", type=Path, default=None, help="where the source distributions are (default: OUT/cache)"
    )
    parser.add_argument(
        "--sources",
        type=Path,
        default=None,
        help="transformers' repository layout holding the model test files (default: $HF_MODEL_TESTS_SOURCES, else OUT/sources)",
    )
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression, to run a subset")
    parser.add_argument("--slow", action="store_true", help="also run tests marked slow (RUN_SLOW=1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument(
        "--memory",
        choices=("lean",),
        default=None,
        help="convert with memory='lean' (LayerNorms and GELU recomputed in backward)",
    )
    args = parser.parse_args(argv)
    names = [n for n in args.families.split(",") if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        parser.error(
            f"--families: unknown {', '.join(unknown) or '(none given)'}; expected some of {', '.join(FAMILIES)}"
        )
    args.families = names
    args.out = args.out.resolve()  # pytest runs in a directory under it
    args.cache = (args.cache or args.out / "cache").resolve()
    args.sources = (args.sources or Path(os.environ.get("HF_MODEL_TESTS_SOURCES") or args.out / "sources")).resolve()
    return args


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"hf_model_tests: {package} is not installed; its model tests need it") from None


def obtain_sdist(package: str, version: str, cache: Path) -> Path:
    """<package>-<version>.tar.gz in `cache`, downloaded there from the configured package index if absent."""
    sdist = cache / f"{package}-{version}.tar.gz"
    if sdist.exists():
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{package}=={version}"]
    done = subprocess.run([*command, "-d", str(cache)], capture_output=True, text=True)
    if done.returncode != 0 or not sdist.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(
            f"hf_model_tests: could not download the source distribution of {package} {version}: {tail[0]}"
        )
    return sdist


def extract_tests(sdist: Path, work: Path) -> None:
    """The source distribution's tests/ into a fresh `work`, with a pytest.ini of its own."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.split("/", 2)[1:2] == ["tests"]]
        for member in members:
            member.name = member.name.split("/", 1)[1]
        tar.extractall(work, members=members, filter="data")
    (work / "pytest.ini").write_text("[pytest]\n")


def build_transformers_tree(sdist: Path, sources: Path, families: list[Family], work: Path) -> dict:
    """A `tests` package in `work`: the source distribution's tests, the families' model test files and
    the support modules from `sources`, stand-ins for support modules `sources` lacks."""
    missing = [f.test_file for f in families if not (sources / f.test_file).is_file()]
    if missing:
        raise SystemExit(
            f"hf_model_tests: {sources} lacks {', '.join(missing)}; --sources must be laid out as transformers' "
            "repository (a checkout of the installed version's tag), since the source distribution has no model tests"
        )
    extract_tests(sdist, work)
    provenance = {"sdist": sdist.name, "sources": str(sources), "from_sources": [], "standins": []}
    for relative in [f.test_file for f in families] + list(SUPPORT_FILES):
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if (sources / relative).is_file():
            shutil.copyfile(sources / relative, target)
            provenance["from_sources"].append(relative)
        else:
            shutil.copyfile(HERE / "standins" / relative, target)
            provenance["standins"].append(relative)
    for directory in [work / "tests", *(p for p in (work / "tests").rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
    # test_pipeline_mixin imports `transformers` from the repository's src/ by path: an empty module
    # there hands it the installed one (the name is already in sys.modules).
    (work / "src" / "transformers").mkdir(parents=True)
    (work / "src" / "transformers" / "__init__.py").touch()
    return provenance


def ensure_parameterized(deps: Path) -> list[str]:
    """Extra sys.path entries the tests need: none when `parameterized` imports here, else `deps`."""
    if importlib.util.find_spec("parameterized") is not None:
        return []
    if not (deps / "parameterized").is_dir():
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(deps), "parameterized"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise SystemExit(
                f"hf_model_tests: transformers' tests import parameterized, and installing it failed: {tail[0]}"
            )
    return [str(deps)]


def run_pytest(
    family: Family, converted: bool, work: Path, out: Path, args: argparse.Namespace, paths: list[str]
) -> dict:
    """{test name: {outcome, reason, where[, traceback]}} of the family's test file under pytest. A test
    that kills the process (a crash in a kernel) is recorded as "crashed" and the run goes on past it."""
    label = "converted" if converted else "original"
    results = out / f"{family.name}-{label}.jsonl"
    log = out / f"{family.name}-{label}.log"
    results.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_SLOW", "PYTEST_ADDOPTS")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(HERE), *paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_MODEL_TESTS_RESULTS=str(results),
        HF_MODEL_TESTS_CONVERT=family.module if converted else "",
        HF_MODEL_TESTS_CLASSES=",".join(family.classes),
        HF_MODEL_TESTS_OPTIONS=json.dumps(dict(family.options, **({"memory": args.memory} if args.memory else {}))),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.slow:
        env["RUN_SLOW"] = "1"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        PLUGIN,
        "-p",
        "no:cacheprovider",
        "-q",
        "--no-header",
        "-rN",
        "--tb=short",
        "--durations=15",
    ]
    command += ["-c", str(work / "pytest.ini"), "--rootdir", str(work), "-W", "ignore"]
    select = " and ".join(f"({e})" for e in (family.select, args.select) if e)
    if select:
        command += ["-k", select]
    command.append(family.test_file)
    done: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout
    while True:
        deselect = [arg for nodeid in done for arg in ("--deselect", nodeid)]
        with open(log, "a") as f:
            try:
                timeout = max(1.0, deadline - time.monotonic())
                rc = subprocess.run(
                    command + deselect, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                rc = None
        started = None
        for line in results.read_text().splitlines() if results.exists() else []:
            entry = json.loads(line)
            if "start" in entry:
                started = entry["start"]
            else:
                done[entry.pop("nodeid")] = entry
                started = None
        if started is None or started in done:
            break
        # The process died inside a test: record it and run the rest.
        tail = [line for line in log.read_text().splitlines() if line.startswith(("Fatal Python error", "Killed"))]
        why = "timed out" if rc is None else (tail[-1] if tail else f"pytest exited with status {rc}")
        done[started] = dict(outcome="crashed", reason=f"the test process died: {why}", where="")
        if rc is None:
            break
    if not done:
        tail = log.read_text().strip().splitlines()[-3:] if log.exists() else []
        raise SystemExit(f"hf_model_tests: pytest ran no test of {family.name}; see {log}: {' | '.join(tail)}")
    return {nodeid.split("::", 1)[1]: entry for nodeid, entry in done.items()}


def refused_by_design(reason: str, traceback: list[str] = ()) -> bool:
    if REFUSED.search(reason):
        return True
    return bool(SCRIPTING.match(reason)) and any("vivit_kernels" in line for line in traceback)


def compare(original: dict, converted: dict) -> dict:
    """Counts, and the tests that pass unconverted but not converted, each with its reason and class."""
    passing = sorted(name for name, entry in original.items() if entry["outcome"] == "passed")
    failures = []
    for name in passing:
        entry = converted.get(name, {"outcome": "missing", "reason": "not run converted", "where": ""})
        if entry["outcome"] != "passed":
            refused = refused_by_design(entry["reason"], entry.get("traceback", ()))
            failures.append(dict(test=name, **entry, refused_by_design=refused))
    counts = {f"original_{o}": sum(e["outcome"] == o for e in original.values()) for o in OUTCOMES}
    counts.update(
        collected=len(original),
        passing_original=len(passing),
        passing_both=len(passing) - len(failures),
        refused_by_design=sum(f["refused_by_design"] for f in failures),
        other_failures=sum(not f["refused_by_design"] for f in failures),
        passing_converted_only=sum(
            e["outcome"] == "passed" and original.get(n, {}).get("outcome") != "passed" for n, e in converted.items()
        ),
    )
    return {"counts": counts, "failures": failures}


def markdown(report: dict) -> str:
    versions = ", ".join(f"{package} {version}" for package, version in report["versions"].items())
    memory = report.get("memory")
    lines = [
        f"{versions}, models converted by vivit_kernels as users convert them (after `from_pretrained`, "
        f"else when built){', with memory=' + repr(memory) if memory else ''} "
        f"(`python -m tools.hf_model_tests{' --slow' if report['slow'] else ''}"
        f"{' --memory ' + memory if memory else ''}{' -k ' + repr(report['select']) if report['select'] else ''}`).",
        "",
        "| family | tests | pass unconverted | of those, pass converted | refused by design | other failures |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, family in report["families"].items():
        c = family["counts"]
        lines.append(
            f"| {name} | {c['collected']} | {c['passing_original']} | {c['passing_both']} | "
            f"{c['refused_by_design']} | {c['other_failures']} |"
        )
    lines += ["", "vit-pytorch ships no tests for its ViViT: nothing to run."]
    for name, family in report["families"].items():
        if family["failures"]:
            reasons = collections.Counter((f["refused_by_design"], f["reason"]) for f in family["failures"])
            lines += [
                "",
                f"### {name}: failing converted, by reason",
                "",
                "| tests | class | reason |",
                "| ---: | --- | --- |",
            ]
            for (refused, reason), count in reasons.most_common():
                kind = "refused by design" if refused else "other"
                lines.append(f"| {count} | {kind} | {reason.replace('|', chr(92) + '|')} |")
            lines += ["", "| test | class | reason |", "| --- | --- | --- |"]
            for f in family["failures"]:
                kind = "refused by design" if f["refused_by_design"] else "other"
                reason = f["reason"].replace("|", "\\|")
                lines.append(f"| `{f['test']}` | {kind} | {f['outcome']}: {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    families = [FAMILIES[n] for n in args.families]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = ensure_parameterized(args.out / "deps")
    report = dict(slow=args.slow, select=args.select, memory=args.memory, versions={}, provenance={}, families={})
    trees = {}
    for package in dict.fromkeys(f.package for f in families):
        version = installed_version(package)
        sdist = obtain_sdist(package, version, args.cache)
        work = trees[package] = args.out / "work" / package
        if package == "transformers":
            mine = [f for f in families if f.package == package]
            report["provenance"][package] = build_transformers_tree(sdist, args.sources, mine, work)
        else:
            extract_tests(sdist, work)
            report["provenance"][package] = {"sdist": sdist.name}
        report["versions"][package] = version
    for family in families:
        runs = {}
        for converted in (False, True):
            start = time.perf_counter()
            runs[converted] = run_pytest(family, converted, trees[family.package], args.out, args, paths)
            label = "converted" if converted else "original"
            print(
                f"{family.name} {label}: {len(runs[converted])} tests in {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        report["families"][family.name] = compare(runs[False], runs[True])
    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    table = markdown(report)
    (args.out / "report.md").write_text(table)
    print(table)
    return int(any(f["counts"]["other_failures"] for f in report["families"].values()))


if __name__ == "__main__":
    sys.exit(main())
