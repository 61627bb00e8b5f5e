"""A converted layer reads and writes its family's state-dict layout.

A converted attention keeps the parameters the kernels want (one packed `qkv`, `proj`, ...), but
its `state_dict()` names and shapes them as the original module did, and `load_state_dict` takes
the original's keys: each family declares, per converted module, which of its tensors are which of
the original's (`KeyLayout`), and `keep_original_keys` registers two state-dict hooks that
translate. So every tool that moves weights by state dict (torch.save, HF `save_pretrained` and
`Trainer` checkpoints, timm's `load_checkpoint`) sees the original model.

Keys the layout does not name keep their names. A state dict in the converted names (saved before
the hooks existed) still loads: only keys in the original's names are translated.

Hugging Face 5.x models also have a hub layout: `save_pretrained` renames some keys back to the
names of earlier releases (ViViT's `encoder.layer.N.attention.attention.query`, VideoMAE's
`q_bias`), and `from_pretrained` renames them forward. `read_saved_keys` makes `load_state_dict`
of a converted model rename them too, so a file its `save_pretrained` wrote (a `Trainer`
checkpoint) loads back.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class KeyLayout:
    """Where a converted module's tensors live in the original's state dict (keys relative to the module).

    renamed: converted name -> original name, for a tensor or a submodule and everything under it,
        e.g. {"proj": "output.dense"}.
    packed: converted submodule -> the original submodules it stacks along dim 0, in order and of
        equal size, e.g. {"qkv": ("q_proj", "k_proj", "v_proj")}: `qkv.weight` is saved as
        `q_proj.weight`, `k_proj.weight`, `v_proj.weight` and loaded from them.
    order: the original's keys in its order; `state_dict()` lists the translated keys so.
    """

    renamed: Mapping[str, str] = field(default_factory=dict)
    packed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    order: tuple[str, ...] = ()

    def to_original(self, key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The original's (key, tensor) entries for one converted entry: itself renamed, or the
        parts of a packed tensor (views of it)."""
        head, dot, tail = key.partition(".")
        if dot and head in self.packed and key not in self.renamed:
            parts = self.packed[head]
            return [(f"{part}.{tail}", chunk) for part, chunk in zip(parts, value.chunk(len(parts)), strict=True)]
        return [(_renamed(key, self.renamed), value)]

    def from_original(self, key: str) -> tuple[str, int | None] | None:
        """(converted key, index of the part for a packed tensor, else None) for an original key;
        None for a key that keeps its name. A tensor renamed by name comes first (VideoMAE's
        `attention.query.bias` is `q_bias`, while `attention.query.weight` is part of `qkv.weight`)."""
        inverse = {original: converted for converted, original in self.renamed.items()}
        if key in inverse:
            return inverse[key], None
        for packed, parts in self.packed.items():
            for index, part in enumerate(parts):
                if key.startswith(part + "."):
                    return f"{packed}.{key[len(part) + 1 :]}", index
        renamed = _renamed(key, inverse)
        return None if renamed == key else (renamed, None)


def _renamed(key: str, renames: Mapping[str, str]) -> str:
    """`key` with its name, or its longest dotted prefix, replaced as `renames` says."""
    for old in sorted(renames, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return renames[old] + key[len(old) :]
    return key


class _SaveOriginalKeys:
    """State-dict post-hook: the module's entries (the tail of the dict, just written) translated
    to the original's keys, in the original's order. Packed parts are copies, so the saved tensors
    share no storage (safetensors refuses tensors that do)."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        translated = {}
        for key in [key for key in state_dict if key.startswith(prefix)]:
            value = state_dict.pop(key)
            entries = self.layout.to_original(key[len(prefix) :], value)
            for name, tensor in entries:
                translated[prefix + name] = tensor if len(entries) == 1 else tensor.clone()
        rank = {name: i for i, name in enumerate(self.layout.order)}
        for key in sorted(translated, key=lambda key: rank.get(key[len(prefix) :], len(rank))):
            state_dict[key] = translated[key]


class _LoadOriginalKeys:
    """Load-state-dict pre-hook: the original's keys under the module's prefix renamed to the
    converted ones, the parts of a packed tensor concatenated. A packed tensor with a part missing
    is left alone, so strict loading names the parts present (unexpected) and the packed tensor
    (missing)."""

    def __init__(self, layout: KeyLayout) -> None:
        self.layout = layout

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        parts: dict[str, dict[int, str]] = {}
        for key in [key for key in state_dict if key.startswith(prefix)]:
            found = self.layout.from_original(key[len(prefix) :])
            if found is None:
                continue
            converted, index = found
            if index is None:
                state_dict[prefix + converted] = state_dict.pop(key)
            else:
                parts.setdefault(prefix + converted, {})[index] = key
        for converted, keys in parts.items():
            count = len(self.layout.packed[converted[len(prefix) :].partition(".")[0]])
            if len(keys) == count:
                state_dict[converted] = torch.cat([state_dict.pop(keys[i]) for i in range(count)])


def keep_original_keys(
    name: str,
    module: nn.Module,
    original: nn.Module,
    *,
    renamed: Mapping[str, str] | None = None,
    packed: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """Make the converted `module` save and load the state dict of `original`, the module it
    replaces (see `KeyLayout` for `renamed` and `packed`).

    The layout is checked at once: `module`'s entries, translated, must be `original`'s keys with
    their shapes, or a ValueError names the layer `name` and the difference. Where nothing is
    renamed or packed and the order is the original's, no hook is needed and none is registered.
    """
    expected = {key: tuple(value.shape) for key, value in original.state_dict().items()}
    layout = KeyLayout(renamed=dict(renamed or {}), packed=dict(packed or {}), order=tuple(expected))
    translated = {
        key: tuple(tensor.shape)
        for converted, value in module.state_dict().items()
        for key, tensor in layout.to_original(converted, value)
    }
    if translated != expected:
        missing = sorted(expected.keys() - translated.keys())
        extra = sorted(translated.keys() - expected.keys())
        shapes = sorted(key for key in expected.keys() & translated.keys() if expected[key] != translated[key])
        raise ValueError(
            f"convert: {name}: the converted layer's state dict does not map onto the original's (missing {missing}, "
            f"extra {extra}, other shapes {shapes}); the original's key layout is not the one convert knows"
        )
    if layout.renamed or layout.packed or list(translated) != list(expected):
        module.register_state_dict_post_hook(_SaveOriginalKeys(layout))
        module.register_load_state_dict_pre_hook(_LoadOriginalKeys(layout))


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
