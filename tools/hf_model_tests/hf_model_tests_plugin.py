"""pytest plugin of `python -m tools.hf_model_tests` (loaded with `-p hf_model_tests_plugin`).

Environment:
    HF_MODEL_TESTS_RESULTS  path of the file this plugin appends to, one JSON object a line: {"start": nodeid}
                            when a test starts, then {"nodeid", "outcome", "reason", "where"[, "traceback"]}
                            when it ends, so a run that dies (a crash in a kernel) still says how far it got.
    HF_MODEL_TESTS_CONVERT  a module defining model classes (e.g. transformers.models.vivit.modeling_vivit):
                            each converts itself with `vivit_kernels.convert` as a user would: a model
                            built by its constructor when the outermost constructor returns, a model
                            built by `from_pretrained` or `_from_config` once that returns, after its
                            weights are loaded. Empty or unset: the models run unconverted.
    HF_MODEL_TESTS_CLASSES  the classes, comma-separated (default: the transformers models defined there).
    HF_MODEL_TESTS_OPTIONS  convert's keyword arguments, as JSON (timm: {"mode": "joint"}).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import threading

import pytest

_RESULTS: dict[str, dict] = {}


def _write(line: dict) -> None:
    path = os.environ.get("HF_MODEL_TESTS_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    module = os.environ.get("HF_MODEL_TESTS_CONVERT")
    if module:
        classes = [name for name in os.environ.get("HF_MODEL_TESTS_CLASSES", "").split(",") if name]
        options = json.loads(os.environ.get("HF_MODEL_TESTS_OPTIONS") or "{}")
        convert_at_construction(importlib.import_module(module), classes or None, options)


def convert_at_construction(module, classes: list[str] | None = None, options: dict | None = None, patch=setattr):
    """Make the model classes of `module` (the named `classes`, else every transformers
    `PreTrainedModel` subclass defined there) convert themselves with `vivit_kernels.convert(model,
    **options)`: a model built by its constructor when the outermost constructor returns, a model built
    by `from_pretrained` or `_from_config` when that returns (loaded first, as users do: transformers
    loads each weight into the module its key names); returns the wrapped class names. `patch` sets
    the wrapped methods (a test passes its monkeypatch's setattr, to undo them)."""
    from vivit_kernels import convert

    if classes is None:
        from transformers import PreTrainedModel

        classes = [
            name
            for name, cls in vars(module).items()
            if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and cls.__module__ == module.__name__
        ]
    # Models under construction or loading in this thread: only the outermost one converts (a task
    # model builds its base model inside its own constructor; from_pretrained builds it inside its own).
    depth = threading.local()

    def outermost(build):
        depth.level = getattr(depth, "level", 0) + 1
        try:
            built = build()
        finally:
            depth.level -= 1
        return depth.level == 0, built

    wrapped = []
    for cls in (getattr(module, name) for name in classes):
        if "__init__" not in vars(cls):
            continue

        def __init__(self, *args, _original=cls.__init__, **kwargs):
            if outermost(lambda: _original(self, *args, **kwargs))[0]:
                convert(self, **(options or {}))

        patch(cls, "__init__", functools.wraps(cls.__init__)(__init__))
        for name in ("from_pretrained", "_from_config"):
            original = getattr(cls, name, None)
            if original is None:
                continue

            def load(klass, *args, _original=original.__func__, **kwargs):
                last, result = outermost(lambda: _original(klass, *args, **kwargs))
                if last:
                    # from_pretrained(..., output_loading_info=True) returns (model, info).
                    convert(result[0] if isinstance(result, tuple) else result, **(options or {}))
                return result

            patch(cls, name, classmethod(functools.wraps(original.__func__)(load)))
        wrapped.append(cls.__name__)
    return wrapped


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Model test files newer than the common modules call self.prepare_config_and_inputs_for_common();
    # ModelTesterMixin of the installed version only has it on its model_tester.
    for item in items:
        cls = getattr(item, "cls", None)
        if (
            cls is not None
            and hasattr(cls, "model_tester")
            and not hasattr(cls, "prepare_config_and_inputs_for_common")
        ):
            cls.prepare_config_and_inputs_for_common = lambda self: (
                self.model_tester.prepare_config_and_inputs_for_common()
            )


def _reason(report: pytest.TestReport) -> tuple[str, str]:
    """The one-line reason of a failed or skipped report, and where it was raised (path:line)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ").splitlines()[0][:300], f"{longrepr[0]}:{longrepr[1]}"
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        lines = crash.message.strip().splitlines() or [""]
        return lines[0][:300], f"{crash.path}:{crash.lineno}"
    text = str(longrepr).strip().splitlines()
    return (text[-1][:300] if text else ""), ""


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        reason, where = _reason(report)
        traceback = report.longreprtext.splitlines()[-40:]
        _write(
            dict(
                nodeid=f"{report.nodeid}::<collection>",
                outcome="error",
                reason=reason,
                where=where,
                traceback=traceback,
            )
        )


def pytest_runtest_logstart(nodeid: str, location) -> None:
    _write({"start": nodeid})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "where": ""})
    subtest = type(report).__name__ == "SubtestReport"
    if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
        if report.passed or (subtest and not report.failed):
            return  # a skipped subtest leaves its test's outcome to the test
        if report.skipped:
            outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        else:
            outcome = "failed" if report.when == "call" else "error"
        if entry["outcome"] in ("failed", "error"):
            return  # keep the first failure (a teardown error after a failed call)
        reason, where = _reason(report)
        entry.update(outcome=outcome, reason=reason, where=where)
        if report.failed:
            entry["traceback"] = report.longreprtext.splitlines()[-40:]


def pytest_runtest_logfinish(nodeid: str, location) -> None:
    _write(dict(nodeid=nodeid, **_RESULTS.pop(nodeid, {"outcome": "passed", "reason": "", "where": ""})))
