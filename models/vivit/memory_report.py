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
this is exact; tests/test_memory_report.py compares it with a direct count of a deeper model
(batch 2 minus batch 1, where the weights cancel) and with the accounting below.

Per token per block, in D-wide tensors (D floats each) plus small per-token statistics:

    fused       16 D + H + 4: x and LN1(x), qkv (3 D), the attention output, the residual y and
                LN2(y), the MLP hidden before and after GELU (8 D); the attention's log-sum-exp
                (H floats) and both LayerNorms' mean and rstd (4 floats)
    fused+lean  10 D + H: x, qkv, the attention output, y, the MLP hidden (LN and GELU recomputed)
    fused+ckpt  1 D: the block input (everything else recomputed in backward)
    model 3     two attentions per block: fused 22 D + 2 H + 6, lean 15 D + 2 H
    sdpa        as fused for joint attention; a factorised attention keeps one D more (SDPA's
                output in group layout besides the copy the output projection reads)
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

from .config import VARIANTS, ViViTConfig, preset_config
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


@dataclass(frozen=True)
class Kept:
    """Bytes kept for backward by one training forward of a model.

    per_clip: activations per clip; weights: the weights autograd keeps (once per step);
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

    @property
    def with_weights(self) -> int:
        """Everything one clip's training forward keeps (batch 1, weights included)."""
        return self.per_clip + self.weights

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
    parameters = _parameter_storages(model)
    storages: dict[tuple[torch.device, int], tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = (storage.nbytes(), _weight_like(tensor, parameters))
        return tensor.detach()  # (see vivit_kernels.saved_bytes: no cycle through the saved output)

    video = _video(model, batch)
    with (
        warnings.catch_warnings(),
        torch.autocast(video.device.type, dtype=autocast, enabled=autocast is not None),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        warnings.simplefilter("ignore")  # "auto" falling back (no fused kernel here) is said elsewhere
        model.train()(video)
    activations = sum(n for n, weight in storages.values() if not weight)
    return activations, sum(n for n, weight in storages.values() if weight)


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
    counts = [kept(model, 1, autocast)]  # one block per stack, then each stack emptied in turn
    emptied = []
    for holder in stacks(model).values():
        emptied.append((holder, holder.blocks))
        holder.blocks = nn.ModuleList()
        counts.append(kept(model, 1, autocast))
    for holder, blocks in emptied:
        holder.blocks = blocks
    names, layers = list(stacks(model)), depths(config)
    block = {name: [a - b for a, b in zip(counts[i], counts[i + 1])] for i, name in enumerate(names)}
    rest = counts[-1]
    total = [rest[i] + sum(layers[name] * block[name][i] for name in names) for i in (0, 1)]
    return Kept(
        variant=variant,
        implementation=implementation,
        per_clip=total[0],
        weights=total[1],
        per_block={name: activations for name, (activations, _) in block.items()},
        rest=rest[0],
        tokens=tokens_per_clip(config),
        depths=layers,
        dim=config.dim,
        element_size=torch.finfo(autocast or torch.float32).bits // 8,
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
