"""vivit.run.evaluation: the bytes-saved report the demo prints."""

from __future__ import annotations

import pytest
import torch
from test_train import TINY, run

from vivit.checkpoint import load_checkpoint
from vivit.run.evaluation import saved_bytes_report


def test_saved_bytes_report_of_the_demo(tmp_path):
    """The demo's memory line: the fused kernels keep less for backward than the naive attention
    on a ViViT-B model-4 layer (16 x 196 tokens); both paths are measured, not assumed."""
    run(
        tmp_path,
        "m",
        *TINY,
        "--steps",
        "1",
        "--batch-size",
        "8",
        "--synthetic-clips",
        "8",
        "--synthetic-val-clips",
        "0",
    )
    state = load_checkpoint(tmp_path / "m" / "checkpoint.pt")
    report = saved_bytes_report(state["model_spec"], torch.randn(1, 3, 8, 32, 32))
    assert all(report[key] > 0 for key in ("fused_model", "naive_model", "fused_vivit_b_layer", "naive_vivit_b_layer"))
    if report["fused_backend"] == "reference":
        pytest.skip("no fused attention backend runs here: both paths are the reference")
    assert report["fused_vivit_b_layer"] < report["naive_vivit_b_layer"]
