"""benchmarks/dropin_memory.py: the activation bytes docs/dropin.md publishes for converted models."""

import pytest

from benchmarks import dropin_memory


def test_lean_keeps_less_and_plain_conversion_keeps_what_the_original_keeps(cpu_kernels):
    pytest.importorskip("timm", reason="the timm family needs timm")
    kept = dropin_memory.measure("timm", "tiny")
    assert kept["converted"] == kept["original"] > 0
    # Per token per block lean drops 2 D + 4 floats (LayerNorm outputs and statistics) and 4 D
    # (GELU's output) of 16 D + H + 4: at D = 64, H = 4, about 0.62 of what default keeps.
    assert 0.55 < kept["lean"] / kept["original"] < 0.70


def test_an_unknown_family_is_one_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        dropin_memory.main(["--families", "timm,detr"])
    assert exit_.value.code == 2
    assert "--families: unknown detr" in capsys.readouterr().err
