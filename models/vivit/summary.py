"""Parameters and FLOPs of the four ViViT variants at one preset and input size.

    python -m vivit.summary                         # ViViT-B, 32 x 224 x 224, tubelets 2x16x16, 400 classes
    python -m vivit.summary --preset vivit_l --frames 16 --img-size 320

GFLOPs are multiply-adds (as in the ViViT paper), counted with torch.utils.flop_counter's
FlopCounterMode (which counts 2 FLOPs per multiply-add) over one clip's forward pass: the
matrix products of the embedding, attention, MLPs and head; normalisation, softmax and
activations are not counted. The models are built on the meta device with the reference
backend: nothing is computed or allocated, and every attention is the reference's einsums,
whose FLOPs torch counts exactly. Fused backends run custom ops whose FLOP formulas may not be
registered (then they count as zero), so counting through them would depend on the machine.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import PRESETS, VARIANTS, preset_config
from .model import create_model

_MODEL_NUMBER = {variant: i + 1 for i, variant in enumerate(VARIANTS)}


@dataclass(frozen=True)
class Row:
    variant: str
    params_m: float  # millions of parameters
    gflops: float  # 10^9 multiply-adds per clip
    tokens: int  # tokens entering the first transformer block (per clip)


def count(preset: str = "vivit_b", variant: str = "spatio_temporal", **overrides) -> Row:
    """Parameters and multiply-adds of one variant for one clip (batch 1)."""
    overrides = {**overrides, "backend": "reference"}
    with torch.device("meta"):
        model = create_model(preset, variant=variant, **overrides).eval()
        c = model.config
        video = torch.empty(1, c.in_chans, c.num_frames, *c.img_size)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)  # (not torch.no_grad(): FlopCounterMode's module hooks trip over it)
    with FlopCounterMode(display=False) as counter:
        model(video)
    nt, nh, nw = model.grid
    tokens = (nh * nw if variant == "factorised_encoder" else nt * nh * nw) + model.num_prefix_tokens
    return Row(variant, params / 1e6, counter.get_total_flops() / 2 / 1e9, tokens)


def table(preset: str = "vivit_b", **overrides) -> list[Row]:
    """One Row per variant."""
    return [count(preset, variant, **overrides) for variant in VARIANTS]


def format_table(rows: list[Row], title: str) -> str:
    lines = [title, f"{'model':<34} {'params (M)':>10} {'GFLOPs':>9} {'tokens':>7}"]
    for row in rows:
        name = f"{_MODEL_NUMBER[row.variant]} {row.variant}"
        lines.append(f"{name:<34} {row.params_m:>10.1f} {row.gflops:>9.1f} {row.tokens:>7}")
    lines.append(
        "GFLOPs: 10^9 multiply-adds per clip (FlopCounterMode FLOPs / 2); tokens: per sequence of the first encoder"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vivit.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vivit_b", choices=sorted(PRESETS))
    parser.add_argument(
        "--frames", type=int, default=32, help="input frames (n_t sampled frames with --tokeniser uniform)"
    )
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W]")
    parser.add_argument(
        "--tubelet", type=int, nargs=3, default=None, metavar=("T", "H", "W"), help="default: the preset's"
    )
    parser.add_argument("--tokeniser", default="tubelet", choices=["tubelet", "uniform"])
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument("--temporal-depth", type=int, default=4, help="L_t of model 2")
    args = parser.parse_args(argv)
    overrides = dict(
        num_frames=args.frames,
        img_size=tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0],
        tokeniser=args.tokeniser,
        num_classes=args.num_classes,
        temporal_depth=args.temporal_depth,
    )
    if args.tubelet:
        overrides["tubelet"] = tuple(args.tubelet)
    rows = table(args.preset, **overrides)
    probe = preset_config(args.preset, **overrides)
    title = (
        f"{args.preset}: {probe.num_frames} frames of {probe.img_size[0]}x{probe.img_size[1]}, "
        f"{probe.tokeniser} {'x'.join(map(str, probe.tubelet))}, {probe.num_classes} classes"
    )
    print(format_table(rows, title))


if __name__ == "__main__":
    main()
