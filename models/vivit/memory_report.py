"""Activation memory of a ViViT training step, per variant and implementation.

    python -m vivit.memory_report                       # ViViT-B, 16 x 224 x 224 clips (1568 tokens), fp32
    python -m vivit.memory_report --frames 8 --img-size 112 --json kept.json

The figure is what autograd keeps for backward after one training forward (the bytes of every
distinct storage saved, as `vivit_kernels.saved_bytes` counts them), split into activations (per
clip, what a batch multiplies) and weights (the parameters' storages and autocast's casts of them,
kept once per step). Implementations:

    einsum      backend="reference": the naive einsum attention (and tubelet embedding)
    sdpa        the fused model with every attention run by torch SDPA (backend "sdpa")
    fused       backend="auto": the fused kernels that fit the device
    fused+lean  fused, memory="lean": blocks recompute LayerNorm and GELU in backward
    fused+ckpt  fused, grad_checkpointing=True: blocks recompute everything in backward

A full ViViT-B forward per (variant, implementation) takes a minute on two CPU cores, so the
count is taken per block: with one block in each stack, then with the stacks emptied one by one,
each stack's block count and the rest (embedding, final norm, head) come out by difference, and
the model's count is the rest plus depth x block. Every block of a stack sees the same shapes, so
this is exact. Per clip is what a third clip adds to a batch of two: a batch of one can keep less
(sdpa's temporal groups are views of the packed qkv only there), so it is counted on its own.
tests/test_memory_report.py compares both with a direct count of a deeper model (batch 3 minus
batch 2, where the weights cancel, and batch 1) and with the accounting below.

Per token per block, in D-wide tensors (D floats each) plus small per-token statistics:

    fused       16 D + H + 4: x and LN1(x), qkv (3 D), the attention output, the residual y and
                LN2(y), the MLP hidden before and after GELU (8 D); the attention's log-sum-exp
                (H floats) and both LayerNorms' mean and rstd (4 floats)
    fused+lean  10 D + H: x, qkv, the attention output, y, the MLP hidden (LN and GELU recomputed)
    fused+ckpt  1 D: the block input (everything else recomputed in backward)
    model 3     two attentions per block: fused 22 D + 2 H + 6, lean 15 D + 2 H
    sdpa        as fused for joint and spatial attention (the projection reads a view of SDPA's
                output); temporal attention one D more (q, k, v copied in group layout in place of
                qkv, and the output's copy the projection reads), split 5 D / 2 more (the halves'
                outputs besides their concatenation, the temporal half's copies of q, k, v); a
                batch of one keeps no such copies
    einsum      the probabilities (H x group length floats) instead of the log-sum-exp; as fused
                for joint attention; a factorised attention keeps q, k, v as copies in group layout
                (3 D, in place of the projection's output)
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vivit_kernels import FactorisedAttention
from vivit_kernels.checks import check_choice

from .config import BLOCK_MEMORY, VARIANTS, ViViTConfig, preset_config
from .model import ViViT, create_model

IMPLEMENTATIONS = ("einsum", "sdpa", "fused", "fused+lean", "fused+ckpt")
_OPTIONS = {
    "einsum": dict(backend="reference"),
    "sdpa": dict(backend="auto"),
    "fused": dict(backend="auto"),
    "fused+lean": dict(backend="auto", memory="lean"),
    "fused+ckpt": dict(backend="auto", grad_checkpointing=True),
}
MODEL_NUMBER = {variant: i + 1 for i, variant in enumerate(VARIANTS)}
MODEL_NAME = {
    "spatio_temporal": "spatio-temporal",
    "factorised_encoder": "factorised encoder",
    "factorised_self_attention": "factorised self-attention",
    "factorised_dot_product": "factorised dot-product",
}
MIB = 2**20


def build(implementation: str, variant: str, preset: str = "vivit_b", **overrides) -> ViViT:
    """The ViViT `variant` as `implementation` runs it; `overrides` are ViViTConfig fields."""
    check_choice("memory_report", "implementation", implementation, IMPLEMENTATIONS)
    model = create_model(preset, variant=variant, **{**overrides, **_OPTIONS[implementation]})
    if implementation == "sdpa":
        # Attention only: the sdpa backend has no tubelet op, and the embedding is not what is compared.
        for module in model.modules():
            if isinstance(module, FactorisedAttention):
                module.backend = "sdpa"
    return model


def stacks(model: ViViT) -> dict[str, nn.Module]:
    """The model's block stacks by name, each a module with `.blocks`: "blocks" (model 2: its spatial
    encoder) and, for model 2, "temporal"."""
    return {"blocks": model} if model.temporal is None else {"blocks": model, "temporal": model.temporal}


def depths(config: ViViTConfig) -> dict[str, int]:
    if config.variant == "factorised_encoder":
        return {"blocks": config.depth, "temporal": config.temporal_depth}
    return {"blocks": config.depth}


def tokens_per_clip(config: ViViTConfig) -> dict[str, int]:
    """Tokens one clip puts through one block of each stack (model 2's spatial blocks see n_t frames)."""
    nt, nh, nw = config.grid
    prefix = int(config.has_cls_token)
    if config.variant == "factorised_encoder":
        return {"blocks": nt * (nh * nw + prefix), "temporal": nt + prefix}
    return {"blocks": nt * nh * nw + prefix}


def forward_flops_per_token(config: ViViTConfig, stack: str) -> float:
    """Multiply-adds x 2 of one block's forward per token: the projections, and attention's QK^T and
    PV over each token's group (length L: 4 L D)."""
    d, hidden = config.dim, int(config.dim * config.mlp_ratio)
    nt, nh, nw = config.grid
    s, prefix = nh * nw, int(config.has_cls_token)
    mlp = 4 * d * hidden
    if config.variant == "factorised_self_attention":
        return 2 * 8 * d * d + mlp + 4 * d * (s + nt)
    if config.variant == "factorised_dot_product":
        return 8 * d * d + mlp + 2 * d * (s + nt)
    if config.variant == "factorised_encoder":
        length = nt + prefix if stack == "temporal" else s + prefix
        return 8 * d * d + mlp + 4 * d * length
    return 8 * d * d + mlp + 4 * d * (nt * s + prefix)


def extra_flops_per_token(config: ViViTConfig, stack: str, policy: str) -> float:
    """Products a policy recomputes in backward, per token (LayerNorm and GELU recomputation is
    elementwise and not counted): recompute_mlp fc1 (2 D x hidden), checkpoint the whole forward."""
    check_choice("extra_flops_per_token", "policy", policy, BLOCK_MEMORY)
    if policy == "recompute_mlp":
        return 2 * config.dim * int(config.dim * config.mlp_ratio)
    return forward_flops_per_token(config, stack) if policy == "checkpoint" else 0.0


@dataclass(frozen=True)
class Kept:
    """Bytes kept for backward by one training forward of a model.

    per_clip: activations per clip (what each clip of a batch of two or more adds); weights: the
    weights autograd keeps (once per step); alone: the activations of a batch of one clip, which
    can be less than per_clip (None: per_clip);
    per_block: activations per clip kept by one block of each stack; rest: activations per clip
    outside the blocks (embedding, final norms, head); tokens: per clip, per stack; dim,
    element_size: the width and the activations' element size (fp32, or the autocast dtype), so
    per_block / (tokens * dim * element_size) counts D-wide tensors per token.
    """

    variant: str
    implementation: str
    per_clip: int
    weights: int
    per_block: dict[str, int]
    rest: int
    tokens: dict[str, int]
    depths: dict[str, int]
    dim: int
    element_size: int
    alone: int | None = None

    @property
    def with_weights(self) -> int:
        """Everything one clip's training forward keeps (batch 1, weights included)."""
        return (self.per_clip if self.alone is None else self.alone) + self.weights

    def tensors_per_token(self, stack: str = "blocks") -> float:
        """D-wide tensors one block of `stack` keeps per token (the unit of the accounting above)."""
        return self.per_block[stack] / (self.tokens[stack] * self.dim * self.element_size)


def _parameter_storages(model: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in model.parameters()}


def _weight_like(tensor: torch.Tensor, parameters: set[int]) -> bool:
    """A parameter's storage, or a copy autocast cast from one (through views: ToCopy -> AccumulateGrad)."""
    if tensor.untyped_storage().data_ptr() in parameters:
        return True
    fn = tensor.grad_fn
    for _ in range(8):
        if fn is None or len(fn.next_functions) != 1:
            return False
        fn = fn.next_functions[0][0]
        if fn is not None and type(fn).__name__ == "AccumulateGrad":
            return fn.variable.untyped_storage().data_ptr() in parameters
    return False


def _video(model: ViViT, batch: int) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(batch)
    device = next(model.parameters()).device
    return torch.randn(batch, c.in_chans, c.num_frames, *c.img_size, generator=g).to(device)


def kept(model: ViViT, batch: int = 1, autocast: torch.dtype | None = None) -> tuple[int, int]:
    """(activations, weights): bytes of the distinct storages autograd saves in one training forward
    of `batch` random clips, split into weights (parameters and their autocast casts) and the rest."""
    activations, parameters, casts = kept_parts(model, batch, autocast)
    return activations, parameters + casts


def kept_parts(model: ViViT, batch: int = 1, autocast: torch.dtype | None = None) -> tuple[int, int, int]:
    """(activations, parameters, casts): as `kept`, the weights split into the parameters' own
    storages and the copies autocast cast from them (memory a step adds to the parameters')."""
    video = _video(model, batch)
    with (
        warnings.catch_warnings(),
        torch.autocast(video.device.type, dtype=autocast, enabled=autocast is not None),
    ):
        warnings.simplefilter("ignore")  # "auto" falling back (no fused kernel here) is said elsewhere
        return saved_parts(lambda: model.train()(video), model)


def saved_parts(run, model: nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> tuple[int, int, int]:
    """(activations, parameters, casts): bytes of the distinct storages autograd saves while `run()`
    runs, split into `model`'s parameters, autocast's casts of them, and the rest; the storages of
    `exclude` (inputs counted elsewhere) not counted."""
    parameters = _parameter_storages(model)
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[tuple[torch.device, int], tuple[int, int]] = {}  # kind: 0 activation, 1 parameter, 2 cast

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() in excluded:
            return tensor.detach()
        kind = 1 if storage.data_ptr() in parameters else 2 if _weight_like(tensor, parameters) else 0
        storages[(tensor.device, storage.data_ptr())] = (storage.nbytes(), kind)
        return tensor.detach()  # (see vivit_kernels.saved_bytes: no cycle through the saved output)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return tuple(sum(n for n, k in storages.values() if k == kind) for kind in (0, 1, 2))


def count(
    implementation: str,
    variant: str,
    preset: str = "vivit_b",
    *,
    device: str | torch.device = "cpu",
    autocast: torch.dtype | None = None,
    **overrides,
) -> Kept:
    """Bytes kept for backward by one training forward, counted per block and summed (module
    docstring). `overrides` are ViViTConfig fields; `autocast`: the dtype of a torch.autocast region."""
    config = preset_config(preset, variant, **overrides)
    torch.manual_seed(0)
    model = build(implementation, variant, preset, **{**overrides, "depth": 1, "temporal_depth": 1}).to(device)
    names, layers = list(stacks(model)), depths(config)

    def per_block(batch: int) -> tuple[dict[str, list[int]], list[int]]:
        """(each stack's block, the rest) at `batch`: one block per stack, then each stack emptied in turn."""
        counts = [kept(model, batch, autocast)]
        emptied = []
        for holder in stacks(model).values():
            emptied.append((holder, holder.blocks))
            holder.blocks = nn.ModuleList()
            counts.append(kept(model, batch, autocast))
        for holder, blocks in emptied:
            holder.blocks = blocks
        return {name: [a - b for a, b in zip(counts[i], counts[i + 1])] for i, name in enumerate(names)}, counts[-1]

    def model_total(block: dict[str, list[int]], rest: list[int], i: int) -> int:
        return rest[i] + sum(layers[name] * block[name][i] for name in names)

    # Per clip: what a third clip adds to a batch of two. A batch of one can keep less (the sdpa
    # backend's temporal groups are views of the packed qkv only there: the batch does not fold into
    # the groups' dim, so from two clips on it copies q, k, v and the output), so batch 1 is counted
    # on its own for `with_weights`.
    (block1, rest1), (block2, rest2), (block3, rest3) = (per_block(batch) for batch in (1, 2, 3))
    block = {name: [c - b for c, b in zip(block3[name], block2[name])] for name in names}
    rest = [c - b for c, b in zip(rest3, rest2)]
    return Kept(
        variant=variant,
        implementation=implementation,
        per_clip=model_total(block, rest, 0),
        weights=model_total(block1, rest1, 1),
        per_block={name: activations for name, (activations, _) in block.items()},
        rest=rest[0],
        tokens=tokens_per_clip(config),
        depths=layers,
        dim=config.dim,
        element_size=torch.finfo(autocast or torch.float32).bits // 8,
        alone=model_total(block1, rest1, 0),
    )


def table(preset: str = "vivit_b", variants=VARIANTS, implementations=IMPLEMENTATIONS, **overrides) -> list[Kept]:
    return [count(impl, variant, preset, **overrides) for variant in variants for impl in implementations]


def _by_variant(rows: list[Kept]) -> dict[str, dict[str, Kept]]:
    out: dict[str, dict[str, Kept]] = {}
    for r in rows:
        out.setdefault(r.variant, {})[r.implementation] = r
    return out


def format_table(rows: list[Kept]) -> list[str]:
    """Two markdown tables: MiB per clip (against einsum, and fused against fused+lean), and D-wide
    tensors kept per token per block of the main stack."""
    grouped = _by_variant(rows)
    impls = [i for i in IMPLEMENTATIONS if any(i in row for row in grouped.values())]
    lean_gain = {"fused", "fused+lean"} <= set(impls)
    lines = [
        "| model | " + " | ".join(impls) + (" | fused / fused+lean |" if lean_gain else " |"),
        "|---" * (len(impls) + 1 + lean_gain) + "|",
    ]
    for variant, row in grouped.items():
        base = row.get("einsum")
        cells = []
        for impl in impls:
            r = row.get(impl)
            if r is None:
                cells.append("-")
                continue
            ratio = f" ({base.per_clip / r.per_clip:.2f}x)" if base is not None and impl != "einsum" else ""
            cells.append(f"{r.per_clip / MIB:.0f}{ratio}")
        if lean_gain:
            cells.append(f"{row['fused'].per_clip / row['fused+lean'].per_clip:.2f}x")
        lines.append(f"| {MODEL_NUMBER[variant]} {MODEL_NAME[variant]} | " + " | ".join(cells) + " |")
    lines += ["", "| model (tokens per clip) | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for variant, row in grouped.items():
        first = next(iter(row.values()))
        cells = [f"{row[i].tensors_per_token():.2f}" if i in row else "-" for i in impls]
        lines.append(
            f"| {MODEL_NUMBER[variant]} {MODEL_NAME[variant]} ({first.tokens['blocks']}) | " + " | ".join(cells) + " |"
        )
    return lines


@dataclass(frozen=True)
class PolicyRow:
    """One block memory policy (config.BLOCK_MEMORY) of the fused model: D-wide tensors kept per token
    per block of each stack, activation bytes per clip, and the products it recomputes in backward
    per clip (FLOPs, 2 per multiply-add; LayerNorm and GELU recomputation is elementwise, not counted)
    against the forward's."""

    variant: str
    policy: str
    tensors_per_token: dict[str, float]
    per_clip: int
    extra_flops_per_clip: float
    forward_flops_per_clip: float


def policy_table(preset: str = "vivit_b", variants=VARIANTS, policies=BLOCK_MEMORY, **overrides) -> list[PolicyRow]:
    rows = []
    for variant in variants:
        config = preset_config(preset, variant, **overrides)
        tokens = tokens_per_clip(config)
        for policy in policies:
            kept = count("fused", variant, preset, **{**overrides, "memory": policy})
            blocks = [(stack, depth) for stack, depth in kept.depths.items()]
            rows.append(
                PolicyRow(
                    variant=variant,
                    policy=policy,
                    tensors_per_token={stack: kept.tensors_per_token(stack) for stack, _ in blocks},
                    per_clip=kept.per_clip,
                    extra_flops_per_clip=sum(
                        d * tokens[s] * extra_flops_per_token(config, s, policy) for s, d in blocks
                    ),
                    forward_flops_per_clip=sum(d * tokens[s] * forward_flops_per_token(config, s) for s, d in blocks),
                )
            )
    return rows


def format_policy_table(rows: list[PolicyRow]) -> list[str]:
    """Markdown: per variant and policy, D-wide tensors per token per block (model 2: spatial /
    temporal), MiB per clip, extra GFLOPs per clip and their share of the blocks' products in a
    step (forward and backward: 3 x the forward's)."""
    lines = [
        "| model | policy | D per token per block | MiB per clip | extra GFLOP per clip | extra / step |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        tensors = " / ".join(f"{t:.2f}" for t in r.tensors_per_token.values())
        share = r.extra_flops_per_clip / (3 * r.forward_flops_per_clip) if r.forward_flops_per_clip else 0.0
        lines.append(
            f"| {MODEL_NUMBER[r.variant]} {MODEL_NAME[r.variant]} | {r.policy} | {tensors} | {r.per_clip / MIB:.1f} | "
            f"{r.extra_flops_per_clip / 1e9:.1f} | {100 * share:.0f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vivit.memory_report", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="vivit_b", help="model size (default vivit_b)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16: 8 x 196 = 1568 tokens)")
    parser.add_argument("--img-size", type=int, default=224, help="frame height and width (default 224)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT")
    parser.add_argument(
        "--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS, metavar="IMPL"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = table(args.preset, args.variants, args.implementations, num_frames=args.frames, img_size=args.img_size)
    config = preset_config(args.preset, num_frames=args.frames, img_size=args.img_size)
    nt, nh, nw = config.grid
    print(
        f"Activation memory of a {args.preset} training step ({args.frames} x {args.img_size} x {args.img_size} "
        f"clips, {nt * nh * nw} tokens, fp32, {torch.get_num_threads()}-thread CPU): MiB kept for backward "
        "per clip (x: einsum / this)"
    )
    lines = format_table(rows)
    for line in lines[: lines.index("")]:
        print(line)
    print(
        "\nD-wide activation tensors kept per token per block (model 2: its spatial encoder; the fraction is "
        "log-sum-exp and LayerNorm statistics)"
    )
    for line in lines[lines.index("") + 1 :]:
        print(line)
    weights = {r.variant: r.weights for r in rows if r.implementation == "fused"}
    if weights:
        print(
            "Weights autograd keeps besides (once per step, fused): "
            + ", ".join(f"model {MODEL_NUMBER[v]} {w / MIB:.0f} MiB" for v, w in weights.items())
        )
    print(
        "\nBlock memory policies (fused; memory= / block_memory=): D-wide tensors kept per token per block, "
        "and the products recomputed in backward per clip (a step: times the batch)"
    )
    policy_rows = policy_table(args.preset, args.variants, num_frames=args.frames, img_size=args.img_size)
    for line in format_policy_table(policy_rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
