"""Block memory policies between lean and checkpointing, and vivit.planning: the per-block policies
compute what the default computes and keep what their accounting says; the planner's predicted peak
of a training step agrees with the peak of live tensor bytes that torch's MemTracker measures over a
real step (data, forward, backward, optimiser), for every variant and precision; its plans fit."""

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import relative_error

from support.memory import count_directly, step_peak
from vivit import ViViT, ViViTConfig, parse_bytes, plan_memory
from vivit.config import BLOCK_MEMORY, VARIANTS
from vivit.layers import Block, BlockConfig, FactorisedSelfAttentionBlock
from vivit.memory_report import count, extra_flops_per_token, format_policy_table, policy_table
from vivit.planning import (
    MEMORY_MARGIN,
    MemoryPlanError,
    apply_plan,
    budget_argument,
    format_bytes,
    measure_costs,
    plan_for_run,
    predict_peak,
)
from vivit_kernels import saved_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

D, H, T, S = 32, 4, 2, 9
TINY = dict(dim=D, num_heads=H, num_frames=4, img_size=24, tubelet=(2, 8, 8), num_classes=5, depth=2, temporal_depth=1)


def _grads(model, video, memory):
    model.set_block_memory(memory)
    out = model(video)
    grads = torch.autograd.grad(out.float().sum(), list(model.parameters()))
    return out, grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_policies_compute_what_default_computes(variant, generator):
    """Every policy, and a mixed list (some blocks checkpointed, the rest lean or recompute_mlp),
    gives the default's logits and gradients, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    model = ViViT(variant=variant, **TINY).train()
    video = torch.randn(2, 3, 4, 24, 24, generator=generator)
    n = model.config.num_blocks
    mixed = tuple(BLOCK_MEMORY[(i + 3) % 4] for i in range(n))  # checkpoint, default, lean, ...
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out, grads = _grads(model, video, "default")
            for memory in ("recompute_mlp", "checkpoint", mixed):
                other, other_grads = _grads(model, video, memory)
                assert torch.equal(other, out), (memory, dtype)
                for a, b in zip(other_grads, grads):
                    assert relative_error(a, b) < 1e-6, (memory, dtype)


@pytest.mark.parametrize("kind", ["block", "model3"])
def test_recompute_mlp_with_dropout_keeps_the_mask(kind, generator):
    """With dropout after the GELU, recompute_mlp runs the lean MLP (the mask must be kept): the
    same outputs and gradients as the default under the same random draws."""
    x = torch.randn(2, T * S, D, generator=generator, requires_grad=True)
    results = []
    for memory in ("default", "recompute_mlp"):
        torch.manual_seed(0)
        config = BlockConfig(D, H, memory=memory, drop=0.1)
        block = (Block(config, mode="split") if kind == "block" else FactorisedSelfAttentionBlock(config)).train()
        torch.manual_seed(1)
        out = block(x, T)
        results.append((out, torch.autograd.grad(out, [x, *block.parameters()], torch.ones_like(out))))
    (out, grads), (other, other_grads) = results
    assert relative_error(other, out) < 1e-6
    for a, b in zip(other_grads, grads):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("kind, tensors, attentions", [("block", 6, 1), ("model3", 11, 2)])
def test_recompute_mlp_keeps_the_mlp_input_only(kind, tensors, attentions, cpu_kernels):
    """Per token, batch 2 less batch 1: lean's 10 (15) D-wide tensors less the MLP hidden (4 D):
    x, qkv, the attention output, y (and model 3's second x, qkv, output), plus the log-sum-exps."""
    torch.manual_seed(0)
    config = BlockConfig(D, H, memory="recompute_mlp")
    block = (Block(config, mode="split") if kind == "block" else FactorisedSelfAttentionBlock(config)).train()
    kept = [saved_bytes(block, torch.randn(batch, T * S, D, requires_grad=True), T) for batch in (1, 2)]
    assert kept[1] - kept[0] == T * S * 4 * (tensors * D + attentions * H)


@pytest.mark.parametrize("variant", ["spatio_temporal", "factorised_encoder"])
def test_a_per_block_list_keeps_the_sum_of_its_policies(variant, cpu_kernels):
    """The whole model's saved bytes under a per-block list (count_directly: batch 2 less batch 1)
    are the rest plus each block's count under its own policy."""
    config = {**TINY, "depth": 3, "temporal_depth": 2}
    n = 5 if variant == "factorised_encoder" else 3
    policies = ("checkpoint", "recompute_mlp", "lean", "default", "checkpoint")[:n]
    per_policy = {p: count("fused", variant, memory=p, **config) for p in set(policies)}
    order = ["blocks"] * 3 + ["temporal"] * (n - 3)
    rest = next(iter(per_policy.values())).rest
    expected = rest + sum(per_policy[p].per_block[s] for p, s in zip(policies, order))
    direct, _ = count_directly("fused", variant, block_memory=policies, **config)
    assert direct == expected
    assert per_policy["checkpoint"].tensors_per_token() == 1  # the block input only


def test_block_memory_is_checked_and_applied():
    model = ViViT(variant="factorised_encoder", **TINY)
    model.set_block_memory(["checkpoint", "lean", "recompute_mlp"])
    assert [b.memory for b in model.all_blocks()] == ["checkpoint", "lean", "recompute_mlp"]
    assert model.config.block_memory == ("checkpoint", "lean", "recompute_mlp")
    model.set_block_memory("lean")
    assert model.config.block_memory == ("lean",) * 3
    built = ViViT(variant="spatio_temporal", block_memory=("checkpoint", "default"), **TINY)
    assert [b.memory for b in built.blocks] == ["checkpoint", "default"]
    with pytest.raises(
        ValueError,
        match=r"^ViViTConfig: block_memory must be 2 policies \(one per block\), each one of 'default', 'lean', "
        r"'recompute_mlp', 'checkpoint', got \('lean',\)$",
    ):
        ViViTConfig(**TINY, block_memory=("lean",))
    with pytest.raises(ValueError, match=r"block_memory must be 2 policies .* got \('lean', 'fast'\)$"):
        model = ViViT(**TINY)
        model.set_block_memory(("lean", "fast"))


def test_policy_table_lists_tensors_and_extra_flops(cpu_kernels):
    rows = policy_table(variants=["factorised_dot_product"], **{**TINY, "depth": 1})
    by_policy = {r.policy: r for r in rows}
    assert list(by_policy) == list(BLOCK_MEMORY)
    tensors = [by_policy[p].tensors_per_token["blocks"] for p in BLOCK_MEMORY]
    assert tensors == pytest.approx([16 + (H + 4) / D, 10 + H / D, 6 + H / D, 1])
    tokens = 2 * 9
    assert by_policy["recompute_mlp"].extra_flops_per_clip == tokens * 2 * D * 4 * D
    assert by_policy["lean"].extra_flops_per_clip == by_policy["default"].extra_flops_per_clip == 0
    # checkpoint recomputes the forward's products: qkv and proj (8 D^2), the MLP (16 D^2), attention.
    assert by_policy["checkpoint"].extra_flops_per_clip == by_policy["checkpoint"].forward_flops_per_clip
    assert by_policy["checkpoint"].forward_flops_per_clip == tokens * (24 * D * D + 2 * D * (9 + 2))
    assert "| 4 factorised dot-product | recompute_mlp | 6.12 |" in "\n".join(format_policy_table(rows))
    with pytest.raises(ValueError, match=r"^extra_flops_per_token: policy must be one of"):
        extra_flops_per_token(ViViTConfig(**TINY), "blocks", "none")


_COSTS: dict = {}


def _costs(variant: str, precision: str):
    key = (variant, precision)
    if key not in _COSTS:
        _COSTS[key] = measure_costs(ViViTConfig(variant=variant, **TINY), precision)
    return _COSTS[key]


# (batch, accumulation steps, policies, optimizer): one plain step, and a mixed list of policies over
# micro-batches (gradients accumulated: alive through the second micro-batch's backward).
CASES = {"fp32": [(1, 1, "default", "adamw"), (4, 2, "mixed", "sgd")], "bf16": [(4, 2, "mixed", "adamw")]}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_predicted_peak_matches_the_measured_step(variant, precision, cpu_kernels):
    """Within 5% of MemTracker's peak of a real training step, never below it by more."""
    costs = _costs(variant, precision)
    config = ViViTConfig(variant=variant, **TINY)
    for batch, accum, memory, optimizer in CASES[precision]:
        policies = (
            tuple(("checkpoint", "recompute_mlp", "lean")[i % 3] for i in range(config.num_blocks))
            if memory == "mixed"
            else (memory,) * config.num_blocks
        )
        torch.manual_seed(0)
        model = ViViT(config)
        model.set_block_memory(policies)
        measured = step_peak(model, batch=batch, precision=precision, optimizer=optimizer, accum_steps=accum)
        predicted = predict_peak(costs, policies, batch // accum, accum, optimizer)["peak"]
        assert abs(predicted / measured - 1) < 0.05, (batch, accum, memory, optimizer, predicted, measured)


def test_the_plan_fits_its_budget_and_is_the_cheapest_that_does(cpu_kernels):
    """A budget between the all-lean and the all-default peaks gets default blocks where they fit,
    lean ones first at the front; its measured peak is within the budget. A budget below every
    policy at the batch accumulates micro-batches; below everything, fits=False says the smallest peak. (No
    margin: the budgets sit between predicted peaks; the margin has its own test.)"""
    variant = "factorised_dot_product"
    config = ViViTConfig(variant=variant, **TINY)
    costs = _costs(variant, "fp32")
    peaks = {p: predict_peak(costs, (p,) * 2, 8)["peak"] for p in BLOCK_MEMORY}
    budget = int((peaks["default"] + peaks["lean"]) / 2)
    plan = plan_memory(config, batch=8, precision="fp32", optimizer="adamw", budget_bytes=budget, costs=costs, margin=0)
    assert plan.fits and plan.policies == ("lean", "default") and plan.accum_steps == 1
    assert plan.predicted_peak_bytes <= budget
    model = ViViT(config)
    apply_plan(plan, model)
    assert step_peak(model, batch=8) <= budget
    roomy = plan_memory(config, batch=8, budget_bytes=10 * peaks["default"], costs=costs, margin=0)
    assert roomy.policies == ("default", "default") and roomy.extra_flops_per_step == 0
    tight = plan_memory(config, batch=8, budget_bytes=int(peaks["checkpoint"]) - 1, costs=costs, margin=0)
    assert tight.fits and tight.micro_batch < 8 and tight.micro_batch * tight.accum_steps == 8
    assert tight.predicted_peak_bytes < peaks["checkpoint"]
    smallest = predict_peak(costs, ("checkpoint",) * 2, 1, 8)["peak"]
    none = plan_memory(config, batch=8, budget_bytes=int(smallest) - 1, costs=costs, margin=0)
    assert not none.fits and none.micro_batch == 1 and none.policies == ("checkpoint", "checkpoint")
    assert none.describe() == none.reason
    assert f"the smallest peak possible is {format_bytes(smallest)} ({smallest:.0f} bytes" in none.reason


def test_the_margin_keeps_a_fraction_of_the_budget_free(cpu_kernels):
    """A budget between a step's predicted peak and that peak / (1 - margin) fits the step without a
    margin and not with one: the plan moves to leaner blocks (or, below the leanest, to smaller
    micro-batches), and its predicted peak is within budget x (1 - margin). When nothing fits, the
    reason says the margin and the budget the smallest peak would need."""
    variant = "factorised_dot_product"
    config = ViViTConfig(variant=variant, **TINY)
    costs = _costs(variant, "fp32")
    margin = MEMORY_MARGIN

    def both(peak):
        budget = int(peak / (1 - margin / 2))  # over the peak, but its usable part is under it
        bare = plan_memory(config, batch=8, budget_bytes=budget, costs=costs, margin=0)
        kept = plan_memory(config, batch=8, budget_bytes=budget, costs=costs)
        assert bare.fits and bare.usable_bytes == budget and bare.predicted_peak_bytes <= budget
        assert kept.fits and kept.margin == margin and kept.usable_bytes == int(budget * (1 - margin))
        assert kept.predicted_peak_bytes <= budget * (1 - margin) < peak
        return bare, kept

    bare, kept = both(predict_peak(costs, ("default",) * 2, 8)["peak"])
    assert bare.policies == ("default", "default") and kept.policies == ("lean", "default")
    assert bare.micro_batch == kept.micro_batch == 8
    # Every block checkpointed: the leanest step of 8 clips (the chain's last).
    bare, kept = both(predict_peak(costs, ("checkpoint",) * 2, 8)["peak"])
    assert bare.micro_batch == 8 and (kept.micro_batch, kept.accum_steps) == (4, 2)
    smallest = predict_peak(costs, ("checkpoint",) * 2, 1, 8)["peak"]
    budget = int(smallest / (1 - margin / 2))
    assert plan_memory(config, batch=8, budget_bytes=budget, costs=costs, margin=0).fits
    none = plan_memory(config, batch=8, budget_bytes=budget, costs=costs, margin=margin)
    assert not none.fits
    assert none.reason.startswith(
        f"plan_memory: nothing fits {format_bytes(budget)} less a {100 * margin:g}% margin ({format_bytes(none.usable_bytes)}): "
        f"the smallest peak possible is {format_bytes(smallest)} ({smallest:.0f} bytes"
    )
    assert none.reason.endswith(f"which needs a budget of {format_bytes(smallest / (1 - margin))}")


@pytest.mark.parametrize("margin", [-0.01, 0.5, 1, float("nan"), True, "0.03"])
def test_the_margin_is_checked(margin):
    config = ViViTConfig(variant="factorised_dot_product", **TINY)
    with pytest.raises(ValueError, match=r"^plan_memory: margin must be a fraction of the budget in \[0, 0\.5\), got "):
        plan_memory(config, batch=8, budget_bytes="1GiB", margin=margin)


def test_describe_and_json(cpu_kernels):
    config = ViViTConfig(variant="factorised_dot_product", **TINY)
    costs = _costs("factorised_dot_product", "fp32")
    peak = predict_peak(costs, ("recompute_mlp", "lean"), 4)["peak"]
    budget = int(peak / 0.95) + 3  # its usable 95% just holds the peak
    plan = plan_memory(config, batch=4, budget_bytes=budget, costs=costs, margin=0.05)
    assert plan.policies == ("recompute_mlp", "lean")
    text = plan.describe()
    assert "blocks: 1 x recompute_mlp, 1 x lean" in text
    assert "batch 4 = micro-batch 4 x 1 accumulation step(s)" in text
    assert f"extra compute: {4 * 18 * 2 * D * 4 * D / 1e9:.2f} GFLOP per step" in text
    usable = int(budget * 0.95)
    assert f"predicted peak {format_bytes(peak)} of {format_bytes(usable)} usable (a {format_bytes(budget)} budget "
    assert "less a 5% margin)" in text
    data = json.loads(plan.to_json())
    assert data["predicted_peak_bytes"] == round(peak) and data["policies"] == ["recompute_mlp", "lean"]
    assert data["budget_bytes"] == budget and data["margin"] == 0.05 and data["usable_bytes"] == usable
    assert data["extra_flops_per_step"] == 4 * 18 * 2 * D * 4 * D


def test_plan_for_run_writes_the_plan_and_refuses_what_nothing_fits(tmp_path, cpu_kernels):
    config = ViViTConfig(variant="spatio_temporal", **TINY)
    args = SimpleNamespace(
        memory_budget="1GiB", batch_size=4, precision="fp32", optimizer="adamw", output_dir=str(tmp_path), accum_steps=1
    )
    plan = plan_for_run(args, config, torch.device("cpu"))
    saved = json.loads((tmp_path / "memory_plan.json").read_text())
    assert saved["predicted_peak_bytes"] == plan.predicted_peak_bytes and saved["policies"] == ["default"] * 2
    model = ViViT(config)
    apply_plan(plan, model, args)
    assert args.accum_steps == 1 and model.config.block_memory == ("default", "default")
    assert saved["margin"] == MEMORY_MARGIN  # args without memory_margin: the planner's default
    args.memory_margin = 0.25
    assert plan_for_run(args, config, torch.device("cpu")).usable_bytes == 3 * 2**28
    args.memory_budget = "64KiB"
    with pytest.raises(
        MemoryPlanError, match=r"^plan_memory: nothing fits 64.0 KiB less a 25% margin \(48.0 KiB\): the smallest peak "
    ):
        plan_for_run(args, config, torch.device("cpu"))


def test_parse_bytes():
    assert parse_bytes("22GiB") == 22 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5gib") == 3 * 2**29
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("4096") == 4096
    for bad in ("22 GiBs", "lots", "12XB", "-1GiB"):
        with pytest.raises(ValueError, match=r"expected a number and a unit, one of B, KiB, MiB, GiB"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match=r"^memory budget must be positive, got 0$"):
        parse_bytes(0)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^memory budget '22GB!': expected a number and a unit"):
        budget_argument("22GB!")


TINY_RUN = [
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--tubelet",
    "2",
    "8",
    "8",
    "--no-progress",
    "--workers",
    "0",
]


def _train(tmp_path, *extra: str) -> int:
    from vivit.cli.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--output-dir", str(tmp_path / "run"), *TINY_RUN, "--steps", "2", "--batch-size", "8", *extra])
        raise SystemExit(0)
    return exit_.value.code


def test_vivit_train_memory_budget_applies_prints_and_writes_the_plan(tmp_path, capsys, monkeypatch, cpu_kernels):
    from vivit.run import trainer as trainer_module

    applied = {}

    def recording_apply_plan(plan, model, args):
        trainer_module_apply(plan, model, args)
        applied.update(policies=model.config.block_policies, accum=args.accum_steps)

    trainer_module_apply = trainer_module.apply_plan
    monkeypatch.setattr(trainer_module, "apply_plan", recording_apply_plan)
    # 2 MiB: the 3.6 MiB default step does not fit, so the plan must change policies or micro-batches.
    assert _train(tmp_path, "--memory-budget", "2MiB") == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "run" / "memory_plan.json").read_text())
    assert plan["fits"] and plan["predicted_peak_bytes"] <= plan["usable_bytes"] < 2 * 2**20 == plan["budget_bytes"]
    assert plan["margin"] == MEMORY_MARGIN
    assert (plan["policies"], plan["micro_batch"]) != (["default", "default"], 8)
    assert f"batch 8 = micro-batch {plan['micro_batch']} x {plan['accum_steps']}" in out
    assert plan["micro_batch"] * plan["accum_steps"] == 8
    assert applied == {"policies": tuple(plan["policies"]), "accum": plan["accum_steps"]}


def test_vivit_train_memory_budget_nothing_fits_is_one_line_and_status_1(tmp_path, capsys, cpu_kernels):
    assert _train(tmp_path, "--memory-budget", "1KiB") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vivit-train: error: --memory-budget: ") and "smallest peak" in err[0]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--memory", "lean"], "--memory"),
        (["--grad-checkpointing"], "--grad-checkpointing"),
        (["--accum-steps", "2"], "--accum-steps"),
    ],
)
def test_vivit_train_memory_budget_refuses_what_it_chooses_itself(tmp_path, capsys, flags, named):
    assert _train(tmp_path, "--memory-budget", "1GiB", *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "--memory-budget chooses" in err[0]


def test_vivit_train_memory_budget_bad_unit_is_a_usage_error(tmp_path, capsys):
    assert _train(tmp_path, "--memory-budget", "22 parsecs") == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_vivit_train_memory_margin_is_passed_to_the_plan(tmp_path, cpu_kernels):
    assert _train(tmp_path, "--memory-budget", "2MiB", "--memory-margin", "0.25") == 0
    plan = json.loads((tmp_path / "run" / "memory_plan.json").read_text())
    assert plan["margin"] == 0.25 and plan["usable_bytes"] == 3 * 2**19 >= plan["predicted_peak_bytes"]


@pytest.mark.parametrize("margin", ["0.5", "-0.1"])
def test_vivit_train_memory_margin_out_of_range_is_one_line_and_status_2(tmp_path, capsys, margin):
    assert _train(tmp_path, "--memory-budget", "2MiB", "--memory-margin", margin) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vivit-train: error: --memory-margin must be in [0, 0.5), got {float(margin)}"]


def test_vivit_train_memory_budget_auto_plans_for_the_free_memory(tmp_path, monkeypatch, cpu_kernels):
    import vivit.planning as planning

    asked = []
    monkeypatch.setattr(planning, "free_memory", lambda device: asked.append(device.type) or 2 * 2**20)
    assert _train(tmp_path, "--memory-budget", "auto") == 0
    plan = json.loads((tmp_path / "run" / "memory_plan.json").read_text())
    assert asked == ["cpu"] and plan["budget_bytes"] == 2 * 2**20


def test_free_memory_on_the_cpu_is_what_the_kernel_reports_available():
    from vivit.planning import free_memory

    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        pytest.skip("no /proc/meminfo on this system")
    available = next(
        int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:")
    )
    assert abs(free_memory(torch.device("cpu")) - available * 1024) < 2**30  # it moves while we read it
