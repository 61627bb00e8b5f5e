"""Activation memory of converted models: what a training forward of each family keeps for backward,
as its library builds it, converted, and converted with memory="lean".

    python -m benchmarks.dropin_memory [--families timm,vivit,videomae,timesformer] [--size base|tiny]

Bytes of every distinct storage autograd saves in one training forward (batch 1, fp32, random
weights), the parameters' own storages excluded: per clip, the same on any machine with the same
backends. Base sizes: timm `vit_base_patch16_224`'s blocks on 1 + 8 x 196 tokens (joint mode),
Hugging Face ViViT base (16 x 224 x 224, gelu_fast), VideoMAE base (16 x 224 x 224) and
TimeSformer base (8 x 224 x 224, divided space-time).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from collections.abc import Callable

import torch

from vivit_kernels import convert

FAMILIES = ("timm", "vivit", "videomae", "timesformer")
# Hugging Face families: (config class, model class, base config overrides); each config's defaults are base.
_HF = {
    "vivit": ("VivitConfig", "VivitModel", dict(num_frames=16)),
    "videomae": ("VideoMAEConfig", "VideoMAEModel", {}),
    "timesformer": ("TimesformerConfig", "TimesformerModel", {}),
}
VARIANTS = ("original", "converted", "lean")


def activation_bytes(model: torch.nn.Module, run: Callable[[torch.nn.Module], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves in `run(model)`, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(model.train())
    return sum(storages.values())


def family_model(family: str, size: str) -> tuple[torch.nn.Module, Callable, dict]:
    """(the original model, its training forward, convert's options)."""
    torch.manual_seed(0)
    base = size == "base"
    if family == "timm":
        from timm.models.vision_transformer import VisionTransformer

        width, frames, grid = (768, 8, 14) if base else (64, 2, 4)
        model = VisionTransformer(embed_dim=width, depth=12 if base else 2, num_heads=12 if base else 4)
        tokens = torch.randn(1, 1 + frames * grid * grid, width)
        return model, lambda m: m.blocks(tokens), {"mode": "joint"}
    import transformers

    config_name, model_name, base_overrides = _HF[family]
    config_class = getattr(transformers, config_name)
    config = config_class(**base_overrides) if base else _tiny(config_class)
    video = torch.randn(1, config.num_frames, 3, config.image_size, config.image_size)
    return getattr(transformers, model_name)(config), lambda m: m(video).last_hidden_state, {}


def _tiny(config_class):
    sizes = dict(image_size=32, patch_size=8, num_frames=4, hidden_size=64, num_hidden_layers=2)
    return config_class(**sizes, num_attention_heads=4, intermediate_size=256)


def measure(family: str, size: str) -> dict[str, int]:
    model, run, options = family_model(family, size)
    models = {
        "original": model,
        "converted": convert(copy.deepcopy(model), **options),
        "lean": convert(copy.deepcopy(model), **options, memory="lean"),
    }
    return {name: activation_bytes(m, run) for name, m in models.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dropin_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    parser.add_argument("--size", choices=("base", "tiny"), default="base")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; expected some of {', '.join(FAMILIES)}")
    warnings.filterwarnings("ignore")  # the libraries' own notices (e.g. an untested config)
    torch.set_num_threads(1)
    print(f"`python -m benchmarks.dropin_memory --families {','.join(families)} --size {args.size}`")
    print("| family | original | converted | converted, lean |")
    print("| --- | --- | --- | --- |")
    for family in families:
        kept = measure(family, args.size)
        o = kept["original"]
        cells = [f"{kept[v] / 2**20:.1f} MiB" + ("" if v == "original" else f" ({kept[v] / o:.3f}x)") for v in VARIANTS]
        print(f"| {family} | {' | '.join(cells)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
