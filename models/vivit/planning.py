"""Plan a training step's memory: predict its peak, and fit it to a budget by arithmetic.

    python -m vivit.planning --preset vivit_b --variant factorised_dot_product --frames 32 \\
        --img-size 224 --batch 8 --precision bf16 --budget 22GiB

A step's live bytes are the parameters, their gradients, the optimiser's state, the batch, the
activations every block keeps for backward under its policy (config.BLOCK_MEMORY) and the
transient peaks of backward and of the optimiser's step. What a block keeps, and how far above that
its own forward and backward reach, are counted per token on a small clip with the model's width,
heads and backends (the counts are linear in tokens, so they scale exactly to the real clip); the
rest of the model (embedding, final norm, head) is counted at the real clip size. The step's peak is
then the largest of:

    backward of block i   W + O + X + A_rest + sum_{j < i} A_j + sum_{j > i} G_j + G_other + E_i
    end of backward       W + O + X + E_rest + G_blocks
    optimiser step        W + O + G + T_opt

W parameters, G gradients (all of them from the second micro-batch on, with accumulation), O the
optimiser state (AdamW 2 W, SGD with momentum W), X the micro-batch, A_j what block j keeps,
E_i block i's own peak over its forward and backward (what it keeps, its gradients and
temporaries, the incoming gradient), T_opt the optimiser's temporaries (on CPU one parameter's
worth twice: AdamW's single-tensor update; on CUDA the foreach update's W).

`plan_memory` walks a chain of per-block policies from the cheapest (every block "default") to
the leanest (every block "checkpoint"), one block at a time, earliest blocks first (their
activations stay alive longest), and returns the first that fits; when none fits the batch, the
largest micro-batch (a divisor of the batch, accumulated to it) that fits, at its cheapest policy.
"Fits" keeps a margin of the budget free (MEMORY_MARGIN by default): a prediction just under the
budget can measure just over it.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import weakref
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torch.utils.weak import WeakIdKeyDictionary

from vivit_kernels.checks import check_choice

from .config import BLOCK_MEMORY, ViViTConfig, preset_config
from .memory_report import (
    extra_flops_per_token,
    forward_flops_per_token,
    kept_parts,
    saved_parts,
    stacks,
    tokens_per_clip,
)
from .model import ViViT

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"adamw": 2, "sgd": 1}  # state tensors per parameter (SGD: momentum)
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
GIB = 2**30
# The fraction of a budget the planner keeps free by default. Predictions have come within -2.13% ..
# +1.96% of MemTracker's measured peaks (docs/memory.md): a plan predicted at 97% of its budget
# measures at most about 99% of it even at the worst under-prediction seen.
MEMORY_MARGIN = 0.03


def parse_bytes(text: str | int) -> int:
    """Bytes of a budget written "22GiB", "512MiB", "1.5GiB", "24GB" (powers of 1000) or a plain
    count of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory budget must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in UNITS and unit != "":
        raise ValueError(
            f"memory budget {text!r}: expected a number and a unit, one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB "
            "(e.g. 22GiB, 512MiB)"
        )
    value = float(match.group(1)) * UNITS[unit or "B"]
    if value < 1:
        raise ValueError(f"memory budget {text!r} must be at least one byte")
    return int(value)


def check_margin(margin: float, name: str = "margin") -> float:
    """`margin` (a fraction of a budget kept free) if 0 <= margin < 0.5, else a ValueError naming it
    as `name`."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
        raise ValueError(f"{name} must be a fraction of the budget in [0, 0.5), got {margin!r}")
    return float(margin)


def usable_bytes(budget: int, margin: float) -> int:
    """What a plan may fill of `budget` bytes, keeping `margin` of it free."""
    return int(budget * (1 - margin))


def budget_argument(text: str) -> int | str:
    """`parse_bytes` for argparse's `type=`, or "auto" (see `free_memory`): a bad budget is the
    parser's one-line error."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def free_memory(device: torch.device) -> int:
    """What `--memory-budget auto` plans for: the GPU's free memory (torch.cuda.mem_get_info, so
    other processes' use counts), or on the CPU the memory the kernel reports available
    (MemAvailable of /proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise MemoryPlanError("--memory-budget auto: cannot read this machine's available memory; give a size (e.g. 16GiB)")


def format_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


@dataclass(frozen=True)
class BlockCost:
    """One block's memory under one policy, per token of its stack (bytes) plus what does not depend
    on tokens; `tensors_per_token` in D-wide units; FLOPs per token of its forward products and of
    what the policy recomputes in backward."""

    policy: str
    kept_per_token: float
    kept_fixed: float
    peak_per_token: float
    peak_fixed: float
    low_peak_per_token: float  # at a few tokens, where the weights' gradients make the peak
    low_peak_fixed: float
    tensors_per_token: float
    extra_flops_per_token: float

    def kept(self, tokens: int) -> float:
        return tokens * self.kept_per_token + self.kept_fixed

    def peak(self, tokens: int) -> float:
        """The block's own peak over its forward and backward at `tokens` tokens."""
        return max(
            tokens * self.peak_per_token + self.peak_fixed, tokens * self.low_peak_per_token + self.low_peak_fixed
        )


@dataclass(frozen=True)
class Costs:
    """Everything the prediction adds up for one config and precision (see the module docstring)."""

    blocks: dict[str, dict[str, BlockCost]]  # stack -> policy -> cost
    tokens: dict[str, int]  # per clip, per stack
    depths: dict[str, int]
    rest_kept_per_clip: float
    rest_kept_fixed: float
    rest_peak_per_clip: float
    rest_peak_fixed: float
    clip_bytes: int  # one clip of video (fp32) and its label
    parameters: int
    block_parameters: dict[str, int]  # per block of each stack
    head_parameters: int  # after the blocks (final norms, head): their gradients come first
    largest_parameter: int
    parameter_tensors: int


class _Peak(TorchDispatchMode):
    """The peak of the bytes of the storages that ops run inside the context made and that are still
    alive (counted when an op returns one, dropped when it is freed); the storages of `existing`
    (parameters, inputs: what a view of them returns) are not counted."""

    def __init__(self, existing=()) -> None:
        super().__init__()
        self.known = WeakIdKeyDictionary()
        for tensor in existing:
            self.known[tensor.untyped_storage()] = 0
        self.live = self.bytes = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage not in self.known:
                    n = self.known[storage] = storage.nbytes()
                    self.live += n
                    weakref.finalize(storage, self._free, n)
        self.bytes = max(self.bytes, self.live)
        return out


def _run_block(block: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    if block.memory == "checkpoint":
        return checkpoint(block, x, frames, use_reentrant=False)
    return block(x, frames)


def _block_probe(block: nn.Module, rows: int, tokens: int, frames: int, autocast) -> tuple[int, int]:
    """(kept, peak) bytes of one block's training forward and backward on `rows` sequences of
    `tokens`: what its graph keeps (activations and casts, not parameters), and the peak of what it
    allocates over forward and backward (the incoming gradient included)."""
    device = next(block.parameters()).device
    shape = (rows, tokens, block.norm1.normalized_shape[0])
    x = torch.randn(shape, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        activations, _, casts = saved_parts(lambda: _run_block(block, x, frames), block)
    with _Peak(tuple(block.parameters())) as peak:
        # The input made inside: in the model it is the previous block's output, alive until this
        # block's backward is done.
        x = torch.randn(shape, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = _run_block(block, x, frames)
        out.backward(torch.ones_like(out))
    for p in block.parameters():
        p.grad = None
    # In the model nothing holds the output once the next block's backward is done, and the input is
    # the previous block's output, counted with that block's kept bytes.
    return activations + casts, peak.bytes - out.numel() * out.element_size() - x.numel() * x.element_size()


def _kept_per_block(config: ViViTConfig, autocast, device) -> dict[str, int]:
    """Activation bytes one clip keeps per block of each stack, as `memory_report.count` counts them:
    the model with one block per stack less the model with that stack emptied (a block's input is
    the previous block's, counted there; its output, kept by what follows, counts here). Per clip
    is what a third clip adds to a batch of two: a backend may keep a view at batch 1 where it keeps
    a copy from batch 2 on (sdpa's temporal groups), so batch 1 would count too little."""
    torch.manual_seed(0)
    model = ViViT(config).to(device)

    def per_clip() -> int:
        return kept_parts(model, 3, autocast)[0] - kept_parts(model, 2, autocast)[0]

    counts = [per_clip()]
    for holder in stacks(model).values():
        holder.blocks = nn.ModuleList()
        counts.append(per_clip())
    return {stack: counts[i] - counts[i + 1] for i, stack in enumerate(stacks(model))}


def _proxy(config: ViViTConfig) -> ViViTConfig:
    """The config on a small clip (2 token frames of 3 x 3 patches): the same blocks, backends and
    per-token layout."""
    t, h, w = config.tubelet
    frames = 2 if config.tokeniser == "uniform" else 2 * t
    return replace(config, num_frames=frames, img_size=(3 * h, 3 * w), depth=1, temporal_depth=1, block_memory=None)


def _linear(at1: float, at2: float) -> tuple[float, float]:
    """(slope, intercept) through (1, at1) and (2, at2)."""
    return at2 - at1, 2 * at1 - at2


def measure_costs(config: ViViTConfig, precision: str = "fp32", device: str | torch.device = "cpu") -> Costs:
    """Count what the prediction adds up (module docstring) for `config` at `precision` on `device`."""
    check_choice("measure_costs", "precision", precision, tuple(PRECISIONS))
    autocast = PRECISIONS[precision]
    device = torch.device(device)
    proxy = _proxy(config)
    element = torch.finfo(autocast or torch.float32).bits // 8
    blocks: dict[str, dict[str, BlockCost]] = {}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" falling back (no fused kernel here) is said elsewhere
        model = ViViT(proxy).to(device).train()
        nt = proxy.grid[0]
        proxy_tokens = tokens_per_clip(proxy)
        per_block = {
            policy: _kept_per_block(replace(proxy, memory=policy), autocast, device) for policy in BLOCK_MEMORY
        }
        for stack, holder in stacks(model).items():
            block = holder.blocks[0]
            # One row: the tokens one sequence of the stack holds (model 2's spatial encoder: a frame).
            if stack == "temporal":
                tokens, frames = proxy_tokens["temporal"], 1
            elif config.variant == "factorised_encoder":
                tokens, frames = proxy_tokens["blocks"] // nt, 1
            else:
                tokens, frames = proxy_tokens["blocks"], 1 if config.has_cls_token else nt
            # Rows enough for D and 2 D tokens: past the few (about D / 2) where the weights'
            # gradients and their temporaries, not the activations, make the block's peak.
            high = -(-config.dim // tokens)
            costs = {}
            for policy in BLOCK_MEMORY:
                block.memory = policy
                (k1, p1), (k2, p2) = (_block_probe(block, r, tokens, frames, autocast) for r in (1, 2))
                (_, p3), (_, p4) = (_block_probe(block, r, tokens, frames, autocast) for r in (high, 2 * high))
                kept_fixed = 2 * k1 - k2  # autocast's casts of the block's weights
                kept_slope = per_block[policy][stack] / proxy_tokens[stack] * tokens
                low_slope, low_fixed = p2 - p1, 2 * p1 - p2
                high_slope = (p4 - p3) / high
                costs[policy] = BlockCost(
                    policy=policy,
                    kept_per_token=kept_slope / tokens,
                    kept_fixed=kept_fixed,
                    peak_per_token=high_slope / tokens,
                    peak_fixed=p3 - high * high_slope,
                    low_peak_per_token=low_slope / tokens,
                    low_peak_fixed=low_fixed,
                    tensors_per_token=kept_slope / tokens / (config.dim * element),
                    extra_flops_per_token=extra_flops_per_token(config, stack, policy),
                )
            blocks[stack] = costs
        block_parameters = {
            stack: sum(p.numel() * p.element_size() for p in holder.blocks[0].parameters())
            for stack, holder in stacks(model).items()
        }
        # The rest at the real clip: the model with its stacks emptied.
        rest = ViViT(replace(config, depth=1, temporal_depth=1, block_memory=None)).to(device).train()
        for holder in stacks(rest).values():
            holder.blocks = nn.ModuleList()
        kept_rest, peak_rest = [], []
        for batch in (1, 2):
            video = torch.randn(batch, config.in_chans, config.num_frames, *config.img_size, device=device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                activations, _, casts = saved_parts(lambda: rest(video), rest, (video,))  # noqa: B023
            kept_rest.append(activations + casts)
            with _Peak((*rest.parameters(), video)) as peak:
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = rest(video)
                out.float().sum().backward()
                del out
            for p in rest.parameters():
                p.grad = None
            peak_rest.append(peak.bytes)
    rest_kept = _linear(*kept_rest)
    rest_peak = _linear(*peak_rest)
    depths = {"blocks": config.depth}
    if config.variant == "factorised_encoder":
        depths["temporal"] = config.temporal_depth
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = ViViT(replace(config, block_memory=None))
    params = [p for p in meta.parameters() if p.requires_grad]
    after = [meta.norm, meta.head] + ([meta.temporal.norm] if meta.temporal is not None else [])
    head = sum(p.numel() * 4 for module in after for p in module.parameters())
    clip = config.in_chans * config.num_frames * config.img_size[0] * config.img_size[1] * 4 + 8
    return Costs(
        blocks=blocks,
        tokens=tokens_per_clip(config),
        depths=depths,
        rest_kept_per_clip=rest_kept[0],
        rest_kept_fixed=rest_kept[1],
        rest_peak_per_clip=rest_peak[0],
        rest_peak_fixed=rest_peak[1],
        clip_bytes=clip,
        parameters=sum(p.numel() * 4 for p in params),
        block_parameters=block_parameters,
        head_parameters=head,
        largest_parameter=max(p.numel() * 4 for p in params),
        parameter_tensors=len(params),
    )


def _stack_order(costs: Costs) -> list[str]:
    """The stack of every block, in forward order (model 2: spatial blocks, then temporal)."""
    return [stack for stack, depth in costs.depths.items() for _ in range(depth)]


def predict_peak(
    costs: Costs,
    policies: tuple[str, ...],
    micro_batch: int,
    accum_steps: int = 1,
    optimizer: str = "adamw",
    device_type: str = "cpu",
) -> dict[str, float]:
    """The phases of a step's peak (module docstring), in bytes, and "peak", their largest."""
    check_choice("predict_peak", "optimizer", optimizer, tuple(OPTIMIZERS))
    order = _stack_order(costs)
    if len(policies) != len(order):
        raise ValueError(f"predict_peak: {len(order)} block policies expected, got {len(policies)}")
    m = micro_batch
    w = costs.parameters
    state = OPTIMIZERS[optimizer] * w + (4 * costs.parameter_tensors if optimizer == "adamw" else 0)
    base = w + state + m * costs.clip_bytes
    block_grads = [costs.block_parameters[s] for s in order]
    other_grads = costs.head_parameters
    rest_kept = m * costs.rest_kept_per_clip + costs.rest_kept_fixed
    kept = [costs.blocks[s][p].kept(m * costs.tokens[s]) for s, p in zip(order, policies)]
    own = [costs.blocks[s][p].peak(m * costs.tokens[s]) for s, p in zip(order, policies)]
    accumulated = w if accum_steps > 1 else 0
    backward = max(
        (
            base + rest_kept + sum(kept[:i]) + max(accumulated, sum(block_grads[i + 1 :]) + other_grads) + own[i]
            for i in range(len(order))
        ),
        default=0.0,
    )
    rest_end = base + m * costs.rest_peak_per_clip + costs.rest_peak_fixed + max(accumulated, sum(block_grads))
    if device_type == "cuda":
        transient = w if optimizer == "adamw" else 0
    else:
        transient = 2 * costs.largest_parameter if optimizer == "adamw" else 0
    step = w + state + w + transient
    return {"backward": backward, "end_of_backward": rest_end, "optimizer": step, "peak": max(backward, rest_end, step)}


@dataclass
class MemoryPlan:
    """A training step fitted to a memory budget (or the reason none fits)."""

    fits: bool
    policies: tuple[str, ...]
    micro_batch: int
    accum_steps: int
    batch: int
    predicted_peak_bytes: int
    budget_bytes: int
    margin: float  # the fraction of the budget kept free
    usable_bytes: int  # budget_bytes less the margin: what the predicted peak must fit
    extra_flops_per_step: float
    forward_flops_per_step: float
    precision: str
    optimizer: str
    variant: str
    phases: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def describe(self) -> str:
        """The plan in words: policy per block, micro-batch and accumulation, peak, extra compute."""
        if not self.fits:
            return self.reason
        runs = []
        for policy in self.policies:
            if runs and runs[-1][0] == policy:
                runs[-1][1] += 1
            else:
                runs.append([policy, 1])
        # A step's products: the forward's, and twice them in backward.
        share = self.extra_flops_per_step / (3 * self.forward_flops_per_step) if self.forward_flops_per_step else 0.0
        return "\n".join(
            [
                f"memory plan ({self.variant}, {self.precision}, {self.optimizer}): "
                f"predicted peak {format_bytes(self.predicted_peak_bytes)} of {format_bytes(self.usable_bytes)} "
                f"usable (a {format_bytes(self.budget_bytes)} budget less a {100 * self.margin:g}% margin)",
                "blocks: " + ", ".join(f"{n} x {policy}" for policy, n in runs),
                f"batch {self.batch} = micro-batch {self.micro_batch} x {self.accum_steps} accumulation step(s)",
                f"extra compute: {self.extra_flops_per_step / 1e9:.2f} GFLOP per step "
                f"({100 * share:.1f}% of the step's products)",
            ]
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def _chain(n: int) -> list[tuple[str, ...]]:
    """Per-block policies from every block "default" to every block "checkpoint", one block moving
    one policy down at a time, earliest blocks first."""
    out = [tuple([BLOCK_MEMORY[0]] * n)]
    for level in range(1, len(BLOCK_MEMORY)):
        for k in range(1, n + 1):
            out.append(tuple([BLOCK_MEMORY[level]] * k + [BLOCK_MEMORY[level - 1]] * (n - k)))
    return out


def _flops(costs: Costs, policies: tuple[str, ...], config: ViViTConfig) -> tuple[float, float]:
    """(extra, forward) FLOPs per clip of the blocks."""
    order = _stack_order(costs)
    extra = sum(costs.tokens[s] * costs.blocks[s][p].extra_flops_per_token for s, p in zip(order, policies))
    forward = sum(costs.tokens[s] * forward_flops_per_token(config, s) for s in order)
    return extra, forward


def plan_memory(
    config: ViViTConfig,
    *,
    batch: int,
    frames: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    precision: str = "fp32",
    optimizer: str = "adamw",
    budget_bytes: int | str,
    device: str | torch.device = "cpu",
    costs: Costs | None = None,
    margin: float = MEMORY_MARGIN,
) -> MemoryPlan:
    """The cheapest per-block memory policy that fits a training step of `batch` clips into
    `budget_bytes` less `margin`; if none does, the largest micro-batch (a divisor of `batch`,
    accumulated to it) that fits, at its cheapest policy; if none does, a plan with fits=False whose
    `reason` names the smallest peak possible.

    Args:
        config: the model (its num_frames / img_size unless `frames` / `img_size` are given).
        batch: clips per optimiser step (one process).
        precision: "fp32", or "bf16" / "fp16" autocast.
        optimizer: "adamw" or "sgd" (with momentum).
        budget_bytes: bytes, or a string "22GiB" (`parse_bytes`).
        device: where the step runs (the counts are taken there, on its backends).
        costs: `measure_costs`' result for this config and precision, if already counted.
        margin: the fraction of the budget kept free, in [0, 0.5): a step fits when its predicted
            peak is at most budget x (1 - margin) (the prediction can fall short of the real peak).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"plan_memory: batch must be a positive int, got {batch!r}")
    check_choice("plan_memory", "precision", precision, tuple(PRECISIONS))
    check_choice("plan_memory", "optimizer", optimizer, tuple(OPTIMIZERS))
    budget = parse_bytes(budget_bytes)
    margin = check_margin(margin, "plan_memory: margin")
    usable = usable_bytes(budget, margin)
    changes = {}
    if frames is not None:
        changes["num_frames"] = frames
    if img_size is not None:
        changes["img_size"] = img_size
    config = replace(config, **changes) if changes else config
    device = torch.device(device)
    costs = costs or measure_costs(config, precision, device)
    chain = _chain(config.num_blocks)
    divisors = [m for m in range(batch, 0, -1) if batch % m == 0]
    best = None
    for micro in divisors:
        for policies in chain:
            phases = predict_peak(costs, policies, micro, batch // micro, optimizer, device.type)
            if best is None or phases["peak"] < best[2]["peak"]:
                best = (micro, policies, phases)
            if phases["peak"] <= usable:
                return _plan(config, costs, policies, micro, batch, phases, budget, margin, precision, optimizer, True)
    micro, policies, phases = best
    plan = _plan(config, costs, policies, micro, batch, phases, budget, margin, precision, optimizer, False)
    plan.reason = (
        f"plan_memory: nothing fits {format_bytes(budget)} less a {100 * margin:g}% margin "
        f"({format_bytes(usable)}): the smallest peak possible is {format_bytes(phases['peak'])} "
        f"({phases['peak']:.0f} bytes: micro-batch {micro}, every block {policies[0]}, {config.variant}, "
        f"{precision}, {optimizer}), which needs a budget of {format_bytes(phases['peak'] / (1 - margin))}"
    )
    return plan


def _plan(config, costs, policies, micro, batch, phases, budget, margin, precision, optimizer, fits) -> MemoryPlan:
    extra, forward = _flops(costs, policies, config)
    return MemoryPlan(
        fits=fits,
        policies=policies,
        micro_batch=micro,
        accum_steps=batch // micro,
        batch=batch,
        predicted_peak_bytes=int(round(phases["peak"])),
        budget_bytes=budget,
        margin=margin,
        usable_bytes=usable_bytes(budget, margin),
        extra_flops_per_step=extra * batch,
        forward_flops_per_step=forward * batch,
        precision=precision,
        optimizer=optimizer,
        variant=config.variant,
        phases={k: int(round(v)) for k, v in phases.items()},
    )


class MemoryPlanError(ValueError):
    """No policy or micro-batch fits the budget (the message names the smallest peak possible)."""


def plan_for_run(
    args, config: ViViTConfig, device: torch.device, world_size: int = 1, write: bool = True
) -> MemoryPlan:
    """What `vivit-train --memory-budget` runs: the plan for `args.memory_budget` (bytes, or "22GiB"),
    each of `world_size` processes taking its share of the global `args.batch_size`, at
    `args.precision` with `args.optimizer`, keeping `args.memory_margin` of it free (MEMORY_MARGIN
    if unset); with `write` (the main process), the plan goes to `args.output_dir`/memory_plan.json. Raises MemoryPlanError (one line naming the smallest peak
    possible) when nothing fits. Apply it with `apply_plan(plan, model, args)` before the optimiser
    and the micro-batches are made."""
    plan = plan_memory(
        config,
        batch=args.batch_size // world_size,
        precision=args.precision,
        optimizer=args.optimizer,
        budget_bytes=free_memory(device) if args.memory_budget == "auto" else args.memory_budget,
        device=device,
        margin=getattr(args, "memory_margin", MEMORY_MARGIN),
    )
    if not plan.fits:
        raise MemoryPlanError(plan.reason)
    if write:
        directory = Path(args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "memory_plan.json").write_text(plan.to_json())
    return plan


def apply_plan(plan: MemoryPlan, model: ViViT, args=None) -> None:
    """Give `model`'s blocks the plan's policies and, with `args`, set args.accum_steps."""
    model.set_block_memory(plan.policies)
    if args is not None:
        args.accum_steps = plan.accum_steps


def largest_batch(
    costs: Costs, policies: tuple[str, ...], budget: int, optimizer: str = "adamw", device_type: str = "cpu"
) -> int:
    """The most clips one step (no accumulation) fits in `budget` under `policies`; 0 if none."""
    low, high = 0, 1
    while predict_peak(costs, policies, high, 1, optimizer, device_type)["peak"] <= budget:
        low, high = high, 2 * high
        if high > 2**20:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        if predict_peak(costs, policies, mid, 1, optimizer, device_type)["peak"] <= budget:
            low = mid
        else:
            high = mid
    return low


PEAK_METHODS = ("tracker", "allocator")


def measure_peak(
    model: ViViT,
    *,
    batch: int,
    precision: str = "fp32",
    optimizer: str = "adamw",
    accum_steps: int = 1,
    method: str = "tracker",
) -> int:
    """The peak bytes of a real training step of `model` on random clips: the trainer's step
    (zero_grad(set_to_none); per micro-batch of batch // accum_steps clips a forward under autocast,
    cross-entropy and backward; the optimiser's step), measured on the second step, once the
    optimiser's state exists. `method` "tracker": the peak of live tensor bytes as
    `torch.distributed._tools.mem_tracker.MemTracker` counts them (parameters, gradients, optimiser
    state, the batch, activations, temporaries); "allocator" (a model on a CUDA device):
    `torch.cuda.max_memory_allocated` over the step after `torch.cuda.reset_peak_memory_stats`, less
    what was allocated before it besides the parameters, their gradients and the optimiser's state."""
    check_choice("measure_peak", "precision", precision, tuple(PRECISIONS))
    check_choice("measure_peak", "optimizer", optimizer, tuple(OPTIMIZERS))
    check_choice("measure_peak", "method", method, PEAK_METHODS)
    c = model.config
    dtype = PRECISIONS[precision]
    device = next(model.parameters()).device
    if method == "allocator" and device.type != "cuda":
        raise ValueError(f"measure_peak: method 'allocator' needs a model on a CUDA device, got one on {device}")
    params = list(model.parameters())
    opt = torch.optim.AdamW(params) if optimizer == "adamw" else torch.optim.SGD(params, lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    micro = batch // accum_steps

    def step(tracker=None) -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(accum_steps):
            if tracker is not None:
                tracker.reset_mod_stats()  # (its module statistics allow one call per module; the peak stays)
            video = torch.randn(micro, c.in_chans, c.num_frames, *c.img_size, generator=generator).to(device)
            labels = torch.randint(0, max(c.num_classes, 1), (micro,), generator=generator).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(video), labels)
            (loss / accum_steps).backward()
            del video, labels, loss
        opt.step()

    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" falling back (no fused kernel here) is said elsewhere
        step()
        if method == "allocator":
            torch.cuda.synchronize(device)
            # Not the step's: what stays allocated besides the parameters, gradients and optimiser
            # state (cuBLAS workspaces, other work's tensors).
            state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
            kept = [t for t in (*params, *(p.grad for p in params), *state) if t is not None and t.device == device]
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
            outside = torch.cuda.memory_allocated(device) - sum(storages.values())
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - outside
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            step(tracker)
    return sum(device["Total"] for device in tracker.get_tracker_snapshot("peak").values())


def fits_table(
    config: ViViTConfig,
    budgets: list[str],
    *,
    precision: str = "bf16",
    optimizer: str = "adamw",
    device: str = "cpu",
    measure: bool = False,
    target: str | None = None,
    margin: float = MEMORY_MARGIN,
) -> list[str]:
    """Markdown: the largest batch each policy (every block) fits in each budget less `margin` (as
    `plan_memory` fits it), predicted; with `measure`, each planned batch's measured peak
    (`measure_peak`, on `device`) and that of one clip more. `target`: the device type whose optimiser step is predicted ("cuda": the foreach
    update), if not `device`'s; the activation counts stay `device`'s."""
    margin = check_margin(margin, "fits_table: margin")
    device_type = target or torch.device(device).type
    costs = measure_costs(config, precision, device)
    header = "| policy | " + " | ".join(f"{b}: batch (predicted peak)" for b in budgets)
    header += " | measured peak, batch / batch + 1 |" if measure and len(budgets) == 1 else " |"
    lines = [header, "|---" * (1 + len(budgets) + (measure and len(budgets) == 1)) + "|"]
    for policy in BLOCK_MEMORY:
        policies = (policy,) * config.num_blocks
        cells, batch = [], 0
        for budget in budgets:
            usable = usable_bytes(parse_bytes(budget), margin)
            batch = largest_batch(costs, policies, usable, optimizer, device_type)
            peak = predict_peak(costs, policies, max(batch, 1), 1, optimizer, device_type)["peak"]
            cells.append(f"{batch} ({format_bytes(peak)})" if batch else f"0 (1 clip: {format_bytes(peak)})")
        if measure and len(budgets) == 1 and batch:
            measured = []
            for clips in (batch, batch + 1):
                torch.manual_seed(0)
                model = ViViT(replace(config, block_memory=policies)).to(device)
                measured.append(
                    format_bytes(measure_peak(model, batch=clips, precision=precision, optimizer=optimizer))
                )
            cells.append(" / ".join(measured))
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def check_table(
    config: ViViTConfig,
    *,
    precision: str = "fp32",
    optimizer: str = "adamw",
    device: str = "cpu",
    steps: tuple[tuple[int, int], ...] = ((1, 1), (4, 1), (4, 2)),
) -> tuple[list[str], float]:
    """The prediction against `measure_peak` on `device`, for every policy (every block) and each
    (batch, accumulation steps) of `steps`: markdown rows, and the largest |error| (a fraction)."""
    costs = measure_costs(config, precision, device)
    lines = ["| policy | batch | accumulation | predicted | measured | error |", "|---|---|---|---|---|---|"]
    worst = 0.0
    for policy in BLOCK_MEMORY:
        policies = (policy,) * config.num_blocks
        for batch, accum in steps:
            predicted = predict_peak(costs, policies, batch // accum, accum, optimizer, torch.device(device).type)
            torch.manual_seed(0)
            model = ViViT(replace(config, block_memory=policies)).to(device)
            measured = measure_peak(model, batch=batch, precision=precision, optimizer=optimizer, accum_steps=accum)
            error = predicted["peak"] / measured - 1
            worst = max(worst, abs(error))
            lines.append(
                f"| {policy} | {batch} | {accum} | {predicted['peak']:.0f} | {measured} | {100 * error:+.2f}% |"
            )
    return lines, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vivit.planning", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vivit_b")
    parser.add_argument("--variant", default="spatio_temporal")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dim", type=int, help="override the preset's width")
    parser.add_argument("--depth", type=int, help="override the preset's blocks")
    parser.add_argument("--num-heads", type=int, help="override the preset's heads")
    parser.add_argument("--batch", type=int, help="clips per optimiser step: plan it")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    parser.add_argument("--budget", nargs="+", help="e.g. 22GiB, 512MiB (--table: several)")
    parser.add_argument(
        "--margin",
        type=float,
        default=MEMORY_MARGIN,
        metavar="FRACTION",
        help=f"of each budget kept free (default {MEMORY_MARGIN})",
    )
    parser.add_argument("--device", default="cpu", help="where the step runs (its backends are counted)")
    parser.add_argument(
        "--target", choices=["cpu", "cuda"], help="--table: predict the optimiser step of this device type"
    )
    parser.add_argument("--table", action="store_true", help="the largest batch of each policy per budget")
    parser.add_argument("--measure", action="store_true", help="--table, one budget: measure the batches' peaks")
    parser.add_argument(
        "--check",
        action="store_true",
        help="every policy at batch 1, 4 and 4 in 2 micro-batches: predicted vs measured",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        check_margin(args.margin, "--margin")
    except ValueError as error:
        parser.error(str(error))
    overrides = {k: v for k, v in (("dim", args.dim), ("depth", args.depth), ("num_heads", args.num_heads)) if v}
    config = preset_config(args.preset, args.variant, num_frames=args.frames, img_size=args.img_size, **overrides)
    if args.check:
        lines, worst = check_table(config, precision=args.precision, optimizer=args.optimizer, device=args.device)
        print("\n".join(lines) + f"\nlargest |error|: {100 * worst:.2f}%")
        return
    if args.table:
        if not args.budget:
            parser.error("--table needs --budget")
        for line in fits_table(
            config,
            args.budget,
            precision=args.precision,
            optimizer=args.optimizer,
            device=args.device,
            measure=args.measure,
            target=args.target,
            margin=args.margin,
        ):
            print(line)
        return
    if args.batch is None or args.budget is None:
        parser.error("--batch and --budget are required without --table or --check")
    plan = plan_memory(
        config,
        batch=args.batch,
        precision=args.precision,
        optimizer=args.optimizer,
        budget_bytes=args.budget[0],
        device=args.device,
        margin=args.margin,
    )
    print(plan.to_json() if args.json else plan.describe())
    if not plan.fits:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
