"""tools/hf_model_tests.py: transformers' model tests run on original and converted models.

The full run needs transformers' test files (its source distribution and repository); these tests
check the parts that decide its figures: how outcomes are compared and classed, that a run which
dies inside a test still reports, and that models are converted at construction exactly once.
"""

from __future__ import annotations

import argparse
import sys

import pytest
from conftest import REPO, require_transformers

from tools import hf_model_tests as harness

sys.path.insert(0, str(REPO / "tools" / "hf_model_tests"))
import hf_model_tests_plugin as plugin

REFUSAL = (
    "ValueError: VivitAttention (converted by vivit_kernels): output_attentions=True is not supported; "
    "the fused attention never forms the attention matrix"
)


def outcome(name: str, reason: str = "") -> dict:
    return {"outcome": name, "reason": reason, "where": ""}


def test_compare_counts_the_tests_passing_unconverted_and_classes_each_converted_failure():
    original = {
        "T::a": outcome("passed"),
        "T::b": outcome("passed"),
        "T::c": outcome("passed"),
        "T::d": outcome("skipped", "needs a GPU"),
        "T::e": outcome("failed", "AssertionError"),
    }
    converted = {
        "T::a": outcome("passed"),
        "T::b": outcome("failed", REFUSAL),
        "T::c": outcome("failed", "AttributeError: _VivitAttention has no attribute `k_proj`"),
        "T::d": outcome("skipped", "needs a GPU"),
        "T::e": outcome("passed"),
    }
    result = harness.compare(original, converted)
    counts = result["counts"]
    assert (counts["collected"], counts["passing_original"], counts["passing_both"]) == (5, 3, 1)
    assert (counts["refused_by_design"], counts["other_failures"], counts["passing_converted_only"]) == (1, 1, 1)
    assert [(f["test"], f["refused_by_design"]) for f in result["failures"]] == [("T::b", True), ("T::c", False)]
    table = harness.markdown(
        dict(versions={"transformers": "5"}, slow=False, select=None, families={"vivit": result}, provenance={})
    )
    assert "| vivit | 5 | 3 | 1 | 1 | 1 |" in table
    assert "| `T::c` | other | failed: AttributeError" in table


def test_a_test_missing_from_the_converted_run_counts_as_failing():
    result = harness.compare({"T::a": outcome("passed")}, {})
    assert result["failures"][0]["outcome"] == "missing"
    assert result["counts"]["other_failures"] == 1


def test_an_unknown_family_is_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        harness.parse_args(["--families", "vivit,swin"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--families: unknown swin; expected some of vivit, videomae, timesformer, timm_vit" in error


def test_a_test_that_kills_its_process_is_recorded_and_the_run_goes_on(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "tests").mkdir(parents=True)
    out.mkdir()
    (work / "pytest.ini").write_text("[pytest]\n")
    (work / "tests" / "test_fake.py").write_text(
        "import os\n\n"
        "def test_first():\n    pass\n\n"
        "def test_dies():\n    os._exit(3)\n\n"
        "def test_after():\n    assert False, 'reached'\n"
    )
    family = harness.Family("fake", "none", "", "tests/test_fake.py")
    args = argparse.Namespace(select=None, slow=False, timeout=120, memory=None)
    results = harness.run_pytest(family, False, work, out, args, [])
    assert results["test_first"]["outcome"] == "passed"
    assert results["test_dies"]["outcome"] == "crashed"
    assert results["test_dies"]["reason"] == "the test process died: pytest exited with status 3"
    assert results["test_after"] == {
        "outcome": "failed",
        "reason": "AssertionError: reached",
        "where": results["test_after"]["where"],
        "traceback": results["test_after"]["traceback"],
    }


def test_models_are_converted_once_when_their_outermost_constructor_returns(monkeypatch):
    transformers = require_transformers("the harness converts transformers' models")
    from transformers.models.vivit import modeling_vivit

    wrapped = plugin.convert_at_construction(modeling_vivit, patch=monkeypatch.setattr)
    assert {"VivitModel", "VivitForVideoClassification"} <= set(wrapped)
    config = transformers.VivitConfig(
        num_frames=4, image_size=8, tubelet_size=[2, 4, 4], hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    # The task model builds a VivitModel inside: converting that one too would fail (converted twice).
    for model in (modeling_vivit.VivitForVideoClassification(config), modeling_vivit.VivitModel(config)):
        layers = [m for m in model.modules() if type(m).__name__ in ("VivitAttention", "_VivitAttention")]
        assert [type(m).__name__ for m in layers] == ["_VivitAttention"]


def test_models_loaded_by_from_pretrained_are_converted_once_after_their_weights_load(monkeypatch, tmp_path):
    transformers = require_transformers("the harness converts transformers' models")
    import torch
    from transformers.models.vivit import modeling_vivit

    config = transformers.VivitConfig(
        num_frames=4, image_size=8, tubelet_size=[2, 4, 4], hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    original = modeling_vivit.VivitForVideoClassification(config).eval()
    original.save_pretrained(tmp_path)
    plugin.convert_at_construction(modeling_vivit, patch=monkeypatch.setattr)
    # Converted inside its constructor, the model would not take transformers' per-module weight
    # assignment (q_proj, k_proj, ... are packed into one qkv): users load, then convert.
    loaded, info = modeling_vivit.VivitForVideoClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    built = modeling_vivit.VivitModel._from_config(config)
    for model in (loaded, built):
        layers = [m for m in model.modules() if type(m).__name__ in ("VivitAttention", "_VivitAttention")]
        assert [type(m).__name__ for m in layers] == ["_VivitAttention"]
    video = torch.randn(2, 4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(video).logits, original(video).logits)


def test_torchscript_stopping_in_a_converted_attention_is_refused_by_design_and_elsewhere_is_not():
    reason = "torch.jit.frontend.NotSupportedError: Don't support conversion in JoinedStr:"
    ours = dict(outcome("failed", reason), traceback=['E     File "/site/vivit_kernels/attention.py", line 293'])
    theirs = dict(outcome("failed", reason), traceback=['E     File "/site/timm/layers/mlp.py", line 40'])
    original = {"T::ours": outcome("passed"), "T::theirs": outcome("passed")}
    result = harness.compare(original, {"T::ours": ours, "T::theirs": theirs})
    assert [(f["test"], f["refused_by_design"]) for f in result["failures"]] == [
        ("T::ours", True),
        ("T::theirs", False),
    ]


def test_a_block_lean_does_not_rewrite_is_refused_by_design_and_the_report_names_the_option():
    reason = (
        "ValueError: convert: blocks.0.norm1: memory='lean' fuses a LayerNorm over the last dim with the next "
        "projection, got timm.layers.norm.RmsNorm"
    )
    assert harness.refused_by_design(reason)
    assert not harness.refused_by_design("ValueError: convert: blocks.0.norm1: the norm is wrong")
    result = harness.compare({"T::a": outcome("passed")}, {"T::a": outcome("failed", reason)})
    assert result["counts"]["refused_by_design"] == 1
    table = harness.markdown(
        dict(versions={"timm": "1"}, slow=False, select=None, memory="lean", families={"timm_vit": result})
    )
    assert "with memory='lean' (`python -m tools.hf_model_tests --memory lean`)" in table.splitlines()[0]
