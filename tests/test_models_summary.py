"""`python -m vivit.summary` (models/vivit/summary.py): parameters and multiply-adds per variant."""

from __future__ import annotations

import pytest

from vivit import VARIANTS, create_model
from vivit.summary import count, main

SMALL = dict(
    dim=64, depth=2, num_heads=4, num_frames=8, img_size=(32, 48), tubelet=(2, 8, 8), num_classes=10, temporal_depth=3
)


def expected_macs(variant: str) -> int:
    """Multiply-adds of the matrix products, written down from the architecture."""
    D, Dm, depth, classes, Lt = 64, 256, 2, 10, 3
    nt, S = 4, 4 * 6
    N, K = nt * S, 3 * 2 * 8 * 8  # tokens; inputs per tubelet

    def block(n: int, attended: list[tuple[int, int]]) -> int:
        """A pre-norm block over n tokens; `attended`: (heads' share of D, group length) pairs."""
        projections = 4 * n * D * D  # qkv and output projection
        attention = sum(2 * n * length * width for width, length in attended)  # q k^T and p v
        return projections + attention + 2 * n * D * Dm

    embed, head = N * K * D, D * classes
    if variant == "spatio_temporal":
        return embed + depth * block(N + 1, [(D, N + 1)]) + head
    if variant == "factorised_encoder":
        spatial = nt * depth * block(S + 1, [(D, S + 1)])
        return embed + spatial + Lt * block(nt + 1, [(D, nt + 1)]) + head
    if variant == "factorised_self_attention":
        per_block = block(N, [(D, S), (D, nt)]) + 4 * N * D * D  # a second MSA's projections
        return embed + depth * per_block + head
    return embed + depth * block(N, [(D // 2, S), (D // 2, nt)]) + head


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_match_the_architecture(variant):
    row = count("vivit_b", variant, **SMALL)
    assert row.gflops * 1e9 == pytest.approx(expected_macs(variant), rel=1e-12)
    model = create_model("vivit_b", variant, **SMALL)
    assert row.params_m * 1e6 == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-12)


def test_main_prints_a_row_per_variant(capsys):
    main(["--frames", "8", "--img-size", "32", "48", "--tubelet", "2", "8", "8", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert "vivit_b: 8 frames of 32x48, tubelet 2x8x8, 10 classes" in out
    for i, variant in enumerate(VARIANTS, 1):
        assert f"{i} {variant}" in out
