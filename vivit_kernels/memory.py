"""Bytes an op saves for its backward pass: the activation memory a training step keeps per layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run `fn(*args, **kwargs)` and return the bytes of every distinct storage autograd saved.

    Storages are counted once each (q, k, v viewed out of one packed qkv share one storage)
    at their full size, on any device. Inputs that autograd saves count too: they are what
    the backward pass keeps alive.
    """
    storages: dict[tuple[torch.device, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
        # Detached: an op that saves its own output would otherwise hold its grad_fn through the
        # packed tensor, a cycle inside autograd that no garbage collector sees (the graph leaks).
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(*args, **kwargs)
    return sum(storages.values())
