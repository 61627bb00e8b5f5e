"""The memory plan against real training steps: the memory part of `make gpu-check`.

    python -m vivit.planning_check [--quick] [--device cpu] [--json]

On a CUDA device, ViViT-B at 16 frames of 224 x 224 under bf16 autocast with AdamW:

  prediction  for each variant and policy (every block "default", then "lean"), the peak that
              `plan_memory` adds up (`predict_peak`) against the measured peak of a training step at
              batch 2: `measure_peak(method="allocator")`, torch.cuda.max_memory_allocated over the
              trainer's second step after torch.cuda.reset_peak_memory_stats. It fails beyond 5% either
              way (the planner's bar: within 5%, never below the measurement by more).
  budget      a budget of 40% of the device's memory and a global batch of 64, planned with the
              planner's default margin (planning.MEMORY_MARGIN of the budget kept free): the step of
              the plan's micro-batch must measure within the budget, and the step of one clip more
              than the largest micro-batch the plan's policies fit in the whole budget (by prediction)
              must measure over it (or run out of memory). With accumulation, two micro-batches are
              run: from the second on the gradients are alive, and every later one peaks the same.

Without CUDA (or with --device cpu) the same checks run on the CPU at a tiny config, measured by
MemTracker (as `python -m vivit.planning --check`), at batch 8, with a budget between the predicted all-default
peaks of 3 and 4 clips and a global batch of 8; the CUDA checks are reported as skipped, with the
reason. `--quick`: models 1 and 3, policy "default" only; the budget check on model 1 either way.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import dataclass, field, replace

import torch

from vivit_kernels.checks import check_choice

from . import planning
from .config import VARIANTS, ViViTConfig, preset_config
from .model import ViViT

TOLERANCE = 0.05  # |predicted / measured - 1|
POLICIES = {False: ("default", "lean"), True: ("default",)}
QUICK_VARIANTS = ("spatio_temporal", "factorised_self_attention")
BUDGET_VARIANT = "spatio_temporal"
BUDGET_FRACTION = 0.4  # of the CUDA device's memory
# The tests' tiny model (2 blocks of width 32, 18 tokens): a step is milliseconds.
TINY = dict(dim=32, num_heads=4, num_frames=4, img_size=24, tubelet=(2, 8, 8), num_classes=5, depth=2, temporal_depth=1)
CPU_BUDGET_CLIPS = 3  # the CPU budget: midway between the all-default peaks of 3 and 4 clips


@dataclass(frozen=True)
class Setting:
    """Where and what the checks run: the model of each variant, the step and how its peak is measured."""

    device: str
    description: str
    configs: dict[str, ViViTConfig]
    method: str  # measure_peak's
    measured_by: str
    batch: int = 2  # of the prediction checks
    global_batch: int = 64
    precision: str = "bf16"
    optimizer: str = "adamw"
    costs: dict = field(default_factory=dict, compare=False)  # variant -> planning.Costs, counted once


def cuda_setting() -> Setting:
    configs = {v: preset_config("vivit_b", v, num_frames=16, img_size=224) for v in VARIANTS}
    return Setting(
        device="cuda",
        description="ViViT-B, 16 x 224 x 224",
        configs=configs,
        method="allocator",
        measured_by="torch.cuda.max_memory_allocated over the second step",
    )


def cpu_setting() -> Setting:
    return Setting(
        device="cpu",
        description="tiny (width 32, 2 blocks, 4 x 24 x 24)",
        configs={v: ViViTConfig(variant=v, **TINY) for v in VARIANTS},
        method="tracker",
        measured_by="MemTracker's peak of live tensor bytes over the second step",
        batch=8,  # at 2 clips the tiny model's peak is its weights' (end of backward), whatever the policy
        global_batch=8,
    )


def _costs(setting: Setting, variant: str) -> planning.Costs:
    if variant not in setting.costs:
        setting.costs[variant] = planning.measure_costs(setting.configs[variant], setting.precision, setting.device)
    return setting.costs[variant]


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure(setting: Setting, variant: str, policies: tuple[str, ...], micro_batch: int, accum_steps: int):
    """The measured peak of a step of `accum_steps` micro-batches of `micro_batch` clips, a fresh
    model with `policies`; None when it ran out of memory."""
    _release(setting.device)
    torch.manual_seed(0)
    model = ViViT(replace(setting.configs[variant], block_memory=policies)).to(setting.device)
    try:
        return planning.measure_peak(
            model,
            batch=micro_batch * accum_steps,
            precision=setting.precision,
            optimizer=setting.optimizer,
            accum_steps=accum_steps,
            method=setting.method,
        )
    except torch.OutOfMemoryError:
        return None
    finally:
        del model
        _release(setting.device)


def _phases(setting: Setting, variant: str, policies: tuple[str, ...], micro_batch: int, accum_steps: int) -> dict:
    costs = _costs(setting, variant)
    device_type = torch.device(setting.device).type
    return planning.predict_peak(costs, policies, micro_batch, accum_steps, setting.optimizer, device_type)


def _predict(setting: Setting, variant: str, policies: tuple[str, ...], micro_batch: int, accum_steps: int) -> float:
    return _phases(setting, variant, policies, micro_batch, accum_steps)["peak"]


def compare(setting: Setting, variant: str, policy: str) -> dict:
    """The predicted peak of a step at setting.batch, every block `policy`, against the measured one."""
    policies = (policy,) * setting.configs[variant].num_blocks
    phases = _phases(setting, variant, policies, setting.batch, 1)
    predicted = phases.pop("peak")
    measured = _measure(setting, variant, policies, setting.batch, 1)
    row = {
        "variant": variant,
        "policy": policy,
        "batch": setting.batch,
        "phase": max(phases, key=phases.get),  # the one that sets the predicted peak
        "predicted_bytes": round(predicted),
    }
    if measured is None:
        return {**row, "measured_bytes": None, "error": None, "ok": False}
    error = predicted / measured - 1
    return {**row, "measured_bytes": measured, "error": round(error, 5), "ok": abs(error) <= TOLERANCE}


def budget_for(setting: Setting) -> int:
    """40% of the CUDA device's memory; on the CPU, midway between the predicted all-default peaks of
    CPU_BUDGET_CLIPS clips and one more (the whole machine's memory would fit thousands of tiny clips)."""
    if setting.device == "cuda":
        return int(BUDGET_FRACTION * torch.cuda.get_device_properties(0).total_memory)
    policies = ("default",) * setting.configs[BUDGET_VARIANT].num_blocks
    peaks = [
        _predict(setting, BUDGET_VARIANT, policies, clips, 1) for clips in (CPU_BUDGET_CLIPS, CPU_BUDGET_CLIPS + 1)
    ]
    return int(sum(peaks) / 2)


def budget_check(setting: Setting, budget: int, variant: str = BUDGET_VARIANT) -> dict:
    """plan_memory's plan for setting.global_batch clips in `budget`, with the planner's default
    margin: its micro-batch's step must measure within the budget; one clip more than the largest
    micro-batch its policies fit in the whole budget by prediction must measure over it."""
    config = setting.configs[variant]
    plan = planning.plan_memory(
        config,
        batch=setting.global_batch,
        precision=setting.precision,
        optimizer=setting.optimizer,
        budget_bytes=budget,
        device=setting.device,
        costs=_costs(setting, variant),
        margin=planning.MEMORY_MARGIN,
    )
    result = {
        "variant": variant,
        "budget_bytes": budget,
        "margin": plan.margin,
        "usable_bytes": plan.usable_bytes,
        "global_batch": setting.global_batch,
        "fits": plan.fits,
    }
    if not plan.fits:
        return {**result, "ok": False, "failures": [plan.reason]}
    # From the second micro-batch on the gradients are alive: every later one peaks the same.
    accum = min(plan.accum_steps, 2)
    top = plan.micro_batch
    while _predict(setting, variant, plan.policies, top + 1, plan.accum_steps) <= budget:
        top += 1
    steps, failures = [], []
    for micro, expected in ((plan.micro_batch, "within"), (top + 1, "over")):
        measured = _measure(setting, variant, plan.policies, micro, accum)
        within = measured is not None and measured <= budget
        step = {
            "micro_batch": micro,
            "expected": expected,
            "predicted_bytes": round(_predict(setting, variant, plan.policies, micro, plan.accum_steps)),
            "measured_bytes": measured,  # None: out of memory
            "ok": within == (expected == "within"),
        }
        steps.append(step)
        if not step["ok"]:
            shown = "out of memory" if measured is None else planning.format_bytes(measured)
            failures.append(
                f"budget {planning.format_bytes(budget)}: micro-batch {micro} measured {shown}, expected "
                f"{expected} the budget (predicted {planning.format_bytes(step['predicted_bytes'])})"
            )
    return {
        **result,
        "policies": list(plan.policies),
        "micro_batch": plan.micro_batch,
        "accum_steps": plan.accum_steps,
        "largest_micro_batch": top,
        "steps": steps,
        "ok": not failures,
        "failures": failures,
    }


def run_checks(setting: Setting, quick: bool, log=print) -> dict:
    """Every prediction check and the budget check of `setting`: the part's report (status, rows,
    failures_list)."""
    variants = QUICK_VARIANTS if quick else VARIANTS
    comparisons, failures = [], []
    for variant in variants:
        for policy in POLICIES[quick]:
            row = compare(setting, variant, policy)
            comparisons.append(row)
            error = "out of memory" if row["error"] is None else f"{100 * row['error']:+.2f}%"
            measured = "-" if row["measured_bytes"] is None else planning.format_bytes(row["measured_bytes"])
            log(
                f"memory check: {variant} {policy} batch {row['batch']}: predicted "
                f"{planning.format_bytes(row['predicted_bytes'])}, measured {measured} ({error})"
            )
            if not row["ok"]:
                failures.append(
                    f"{variant} {policy} batch {row['batch']}: predicted {row['predicted_bytes']} bytes, measured "
                    f"{row['measured_bytes']} ({error}; the bar is {100 * TOLERANCE:.0f}%)"
                )
    budget = budget_check(setting, budget_for(setting))
    log(f"memory check: budget {planning.format_bytes(budget['budget_bytes'])}: {'ok' if budget['ok'] else 'FAILED'}")
    failures += budget["failures"]
    errors = [abs(r["error"]) for r in comparisons if r["error"] is not None]
    return {
        "status": "failed" if failures else "passed",
        "device": setting.device,
        "model": setting.description,
        "precision": setting.precision,
        "optimizer": setting.optimizer,
        "measured_by": setting.measured_by,
        "tolerance": TOLERANCE,
        "comparisons": comparisons,
        "worst_error": round(max(errors), 4) if errors else None,
        "budget": budget,
        "failures_list": failures,
    }


def memory_check(quick: bool = False, device: str | None = None, log=print) -> dict:
    """The checks on `device` ("cuda" where one is available, else "cpu"); on the CPU the report's
    "cuda" entry says why the CUDA checks were skipped."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_choice("memory_check", "device", device, ("cuda", "cpu"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("memory_check: device 'cuda' asked for, but there is no CUDA device here")
        return run_checks(cuda_setting(), quick, log)
    reason = "no CUDA device on this machine" if not torch.cuda.is_available() else "--device cpu"
    return {**run_checks(cpu_setting(), quick, log), "cuda": {"status": "skipped", "reason": reason}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vivit.planning_check", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="models 1 and 3, policy default only")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda where available")
    parser.add_argument("--json", action="store_true", help="print the report as JSON, on the last line")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: there is no CUDA device here")
    if args.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny models: a second thread mostly waits for the first

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = memory_check(args.quick, args.device, log)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"memory check: {report['status']}" + "".join(f"\n- {f}" for f in report["failures_list"]))
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
