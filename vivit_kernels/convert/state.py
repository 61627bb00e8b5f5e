"""A converted model reads and writes its family's state dict.

A converted attention takes over the original's modules under their own names
(`common.AdoptedAttention`; timm's layout is FactorisedAttention's own), so `state_dict()`,
`load_state_dict` and `named_parameters()` are the original's, and every tool that moves weights
by name (torch.save, Hugging Face `save_pretrained` / `from_pretrained` and `Trainer`
checkpoints, timm's `load_checkpoint`) sees the original model. `check_same_state` confirms it
for each converted layer.

Hugging Face 5.x models also have a hub layout: `save_pretrained` renames some keys back to the
names of earlier releases (ViViT's `encoder.layer.N.attention.attention.query`, VideoMAE's
`q_bias`), and `from_pretrained` renames them forward. `read_saved_keys` makes `load_state_dict`
of a converted model rename them too, so a file its `save_pretrained` wrote (a `Trainer`
checkpoint) loads back.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def check_same_state(name: str, module: nn.Module, original: nn.Module) -> None:
    """Raise a ValueError naming the layer `name` unless the converted `module`'s state dict has the
    keys, order and shapes of `original`'s (e.g. an original with a tensor the conversion drops)."""
    expected = {key: tuple(value.shape) for key, value in original.state_dict().items()}
    actual = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    if list(actual.items()) != list(expected.items()):
        missing = sorted(expected.keys() - actual.keys())
        extra = sorted(actual.keys() - expected.keys())
        shapes = sorted(key for key in expected.keys() & actual.keys() if expected[key] != actual[key])
        raise ValueError(
            f"convert: {name}: the converted layer's state dict does not map onto the original's (missing {missing}, "
            f"extra {extra}, other shapes {shapes}); the original's key layout is not the one convert knows"
        )


class _LoadSavedKeys:
    """Load-state-dict pre-hook of a Hugging Face model: keys in the layout its `save_pretrained`
    writes are renamed to the model's own, as `from_pretrained` renames them. The renaming is read
    off transformers' own saving rule (`revert_weight_conversion`) applied to the model's keys, so
    it follows the installed release; one that renames nothing leaves the state dict alone."""

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        revert = getattr(sys.modules.get("transformers.core_model_loading"), "revert_weight_conversion", None)
        if revert is None:
            return
        own = list(module.state_dict())
        # Each key tagged with its index: the saved names come back with their tags (renames only).
        saved = revert(module, {key: torch.tensor(i) for i, key in enumerate(own)})
        renames = {key: own[int(tag)] for key, tag in saved.items() if tag.numel() == 1 and key != own[int(tag)]}
        known = set(own)
        for key in [key for key in state_dict if key.startswith(prefix)]:
            name = key[len(prefix) :]
            if name in renames and name not in known:
                state_dict[prefix + renames[name]] = state_dict.pop(key)


def read_saved_keys(model: nn.Module) -> None:
    """Make `model.load_state_dict` (a Hugging Face model's, converted) read the layout its
    `save_pretrained` writes as well as its own: what `Trainer` saves, it resumes from."""
    model.register_load_state_dict_pre_hook(_LoadSavedKeys())
