"""vivit.memory_report: the bytes a ViViT training forward keeps for backward, per variant and
implementation, against the tensor accounting of its docstring (and the README), and its per-block
method against a direct count of a whole, deeper model. The counts are bytes autograd saves: they
hold on any machine."""

import json

import pytest
import torch
from conftest import require_cpu_kernels

from support.memory import count_directly
from vivit import memory_report
from vivit.config import VARIANTS
from vivit.memory_report import IMPLEMENTATIONS, count

pytestmark = pytest.mark.usefixtures("one_thread")

# A small model: D = 64, 4 heads of 16, 6 frames of 40 x 40 in 2 x 8 x 8 tubelets (3 x 25 tokens).
D, H, C, FRAMES, SIZE, NT, S = 64, 4, 3, 6, 40, 3, 25
CONFIG = dict(dim=D, num_heads=H, num_frames=FRAMES, img_size=SIZE, tubelet=(2, 8, 8), num_classes=10)
FP32 = 4


def attention_layer(impl: str, mode: str, groups: list[tuple[int, int]]) -> int:
    """Floats per token kept for one pre-norm attention layer (its LayerNorm, qkv projection,
    attention and output projection). groups: (heads, group length) per head kind."""
    factorised = mode != "joint"
    if impl == "fused+lean":
        return 5 * D + H  # x, qkv (3 D), the attention output; the log-sum-exp
    # x, LN(x), mean and rstd; qkv (3 D), the attention output
    kept = 6 * D + 2
    if impl == "einsum":
        # The probabilities instead of the log-sum-exp.
        return kept + sum(heads * length for heads, length in groups)
    kept += H  # the log-sum-exp
    if impl != "sdpa" or not factorised:
        return kept
    # SDPA per clip of a batch of two or more. spatial: q, k, v are views of qkv and SDPA's output
    # comes in token order, the projection's input as a view of it: nothing more. temporal: the
    # batch does not fold into the groups' dim, so q, k, v are copies (3 D, in place of qkv) and
    # the output, in group layout, is copied for the projection: one D more. split: the halves'
    # outputs (D) besides their concatenation, and the temporal half's copies of q, k, v (3 D / 2)
    # besides qkv, which the spatial half's views keep.
    return kept + {"spatial": 0, "temporal": D, "split": D + 3 * D // 2}[mode]


def mlp_layer(impl: str) -> int:
    """Floats per token kept for the MLP half: y, LN(y) and its statistics, the hidden before and
    after GELU (4 D each); lean keeps y and the hidden before GELU."""
    return 5 * D if impl == "fused+lean" else 10 * D + 2


def block_floats(variant: str, impl: str, stack: str = "blocks") -> int:
    """Floats per token one block keeps (the README's accounting)."""
    if impl == "fused+ckpt":
        return D  # the block input; the rest is recomputed in backward
    if variant == "factorised_encoder":
        length = NT + 1 if stack == "temporal" else S + 1  # each with a CLS token
        return attention_layer(impl, "joint", [(H, length)]) + mlp_layer(impl)
    if variant == "spatio_temporal":
        return attention_layer(impl, "joint", [(H, NT * S + 1)]) + mlp_layer(impl)
    if variant == "factorised_dot_product":
        return attention_layer(impl, "split", [(H // 2, S), (H // 2, NT)]) + mlp_layer(impl)
    return attention_layer(impl, "spatial", [(H, S)]) + attention_layer(impl, "temporal", [(H, NT)]) + mlp_layer(impl)


def rest_floats(variant: str) -> int:
    """Floats per clip kept outside the blocks, the same for every implementation: the video (the
    tubelet op keeps it, the einsum path a copy cut into tubes); each final LayerNorm's input and
    statistics; the head's input: the pooled vector, or with a CLS token the normalised tokens,
    which the CLS row's view keeps whole."""
    video = C * FRAMES * SIZE * SIZE
    if variant == "factorised_encoder":
        spatial, temporal = NT * (S + 1), NT + 1
        return video + spatial * (D + 2) + temporal * (D + 2) + temporal * D
    if variant == "spatio_temporal":
        tokens = NT * S + 1
        return video + tokens * (D + 2) + tokens * D
    return video + NT * S * (D + 2) + D


def test_the_accounting_in_d_wide_units():
    """The figures the README quotes: 16 D-wide tensors per token per block by default, 10 lean, 1
    checkpointed; model 3's two-attention blocks 22 and 15 (plus per-token statistics)."""
    assert block_floats("factorised_dot_product", "fused") == 16 * D + H + 4
    assert block_floats("factorised_dot_product", "fused+lean") == 10 * D + H
    assert block_floats("factorised_self_attention", "fused") == 22 * D + 2 * H + 6
    assert block_floats("factorised_self_attention", "fused+lean") == 15 * D + 2 * H
    assert block_floats("spatio_temporal", "fused+ckpt") == D


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_bytes_per_block_and_per_clip(variant, impl):
    if impl.startswith("fused"):  # on the CPU, "auto" counted as the C++ kernels
        require_cpu_kernels()
    kept = count(impl, variant, depth=2, temporal_depth=3, **CONFIG)
    stacks = ["blocks", "temporal"] if variant == "factorised_encoder" else ["blocks"]
    assert sorted(kept.per_block) == sorted(stacks)
    tokens = {
        "spatio_temporal": {"blocks": 1 + NT * S},
        "factorised_encoder": {"blocks": NT * (1 + S), "temporal": 1 + NT},
    }.get(variant, {"blocks": NT * S})
    assert kept.tokens == tokens
    for stack in stacks:
        assert kept.per_block[stack] == FP32 * tokens[stack] * block_floats(variant, impl, stack), stack
    assert kept.rest == FP32 * rest_floats(variant)
    assert kept.per_clip == kept.rest + sum(kept.depths[s] * kept.per_block[s] for s in stacks)
    assert kept.depths == ({"blocks": 2, "temporal": 3} if variant == "factorised_encoder" else {"blocks": 2})
    # A batch of one keeps less only where SDPA's temporal groups are views there (attention_layer):
    # model 3 the projection's copy of the output (D), model 4 the temporal half's q, k, v (3 D / 2).
    alone = {"factorised_self_attention": D, "factorised_dot_product": 3 * D // 2}.get(variant, 0) * (impl == "sdpa")
    assert kept.alone == kept.per_clip - FP32 * 2 * tokens["blocks"] * alone


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_per_block_count_equals_a_direct_count_of_a_deeper_model(variant, impl):
    """The per-block sum (one block per stack, stacks emptied in turn; weights told apart by
    storage) equals the whole model's saved_bytes at batch 2 minus batch 1, and at batch 1."""
    kept = count(impl, variant, depth=3, temporal_depth=2, **CONFIG)
    per_clip, batch1 = count_directly(impl, variant, depth=3, temporal_depth=2, **CONFIG)
    assert (kept.per_clip, kept.with_weights) == (per_clip, batch1)
    assert kept.weights > 0


@pytest.mark.parametrize("impl", ["einsum", "fused+lean", "fused+ckpt"])
def test_autocast_casts_of_weights_are_weights(impl):
    """Under bf16 autocast the weights' casts are kept once per step, not per clip: the per-block
    count still equals the difference between batches, where they cancel."""
    variant = "factorised_self_attention"
    kept = count(impl, variant, autocast=torch.bfloat16, depth=2, **CONFIG)
    assert kept.element_size == 2
    direct = count_directly(impl, variant, autocast=torch.bfloat16, depth=2, **CONFIG)
    assert (kept.per_clip, kept.with_weights) == direct


def test_lean_and_checkpointing_keep_less_than_fused(cpu_kernels):
    rows = {impl: count(impl, "factorised_dot_product", **CONFIG) for impl in IMPLEMENTATIONS}
    per_clip = [rows[impl].per_clip for impl in ("sdpa", "fused", "fused+lean", "fused+ckpt")]
    assert per_clip == sorted(per_clip, reverse=True)
    # einsum's probabilities outweigh SDPA's extra copy only at long groups, not at this size.
    assert rows["einsum"].per_clip > rows["fused"].per_clip
    assert rows["fused+lean"].tensors_per_token() == pytest.approx(10 + H / D)


def test_bad_implementation():
    with pytest.raises(
        ValueError,
        match=r"^memory_report: implementation must be one of 'einsum', 'sdpa', 'fused', "
        r"'fused\+lean', 'fused\+ckpt', got 'flash'$",
    ):
        memory_report.build("flash", "spatio_temporal")


def test_cli_prints_both_tables_and_writes_json(tmp_path, capsys):
    path = tmp_path / "kept.json"
    memory_report.main(
        ["--frames", "2", "--img-size", "32", "--variants", "factorised_dot_product", "--json", str(path)]
    )
    out = capsys.readouterr().out
    assert "| model | einsum | sdpa | fused | fused+lean | fused+ckpt | fused / fused+lean |" in out
    assert "| 4 factorised dot-product (4) | " in out
    rows = json.loads(path.read_text())
    assert [r["implementation"] for r in rows] == list(IMPLEMENTATIONS)
    assert {r["variant"] for r in rows} == {"factorised_dot_product"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_memory_policies_per_block(variant, cpu_kernels):
    """memory="recompute_mlp": lean's attention layers and the MLP's input y only (fc1, GELU and
    LN2 recomputed); "checkpoint": the block input; "lean" as fused+lean. The rest is unchanged."""
    stacks = ["blocks", "temporal"] if variant == "factorised_encoder" else ["blocks"]
    lean = count("fused+lean", variant, depth=1, temporal_depth=1, **CONFIG)
    for policy, mlp in (("lean", 5 * D), ("recompute_mlp", D), ("checkpoint", None)):
        kept = count("fused", variant, depth=1, temporal_depth=1, memory=policy, **CONFIG)
        for stack in stacks:
            floats = D if mlp is None else block_floats(variant, "fused+lean", stack) - mlp_layer("fused+lean") + mlp
            assert kept.per_block[stack] == FP32 * kept.tokens[stack] * floats, (policy, stack)
        assert kept.rest == lean.rest


def test_cli_prints_the_policy_table(capsys):
    memory_report.main(["--frames", "2", "--img-size", "32", "--variants", "factorised_dot_product"])
    out = capsys.readouterr().out
    assert "| model | policy | D per token per block | MiB per clip | extra GFLOP per clip | extra / step |" in out
    for policy, tensors in (("default", "16.02"), ("lean", "10.02"), ("recompute_mlp", "6.02"), ("checkpoint", "1.00")):
        assert f"| 4 factorised dot-product | {policy} | {tensors} |" in out
