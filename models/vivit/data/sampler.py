"""A shuffling sampler that shards over processes and can start mid-epoch (for exact resume)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Indices of one epoch for one process, from any position.

    Each epoch is a permutation seeded by (seed, epoch), padded by wrapping so every process
    gets the same number of items; process `rank` takes every `world_size`-th index starting at
    `rank`. With per-process batches of b, the union of batch k over all processes is items
    [k*b*W, (k+1)*b*W) of the permutation: the same global batch a single process with batch
    b*W draws, which makes a distributed run comparable to a single-process one.

    Args:
        length: dataset length.
        shuffle: permute each epoch (else the identity order).
        seed: the permutations.
        rank, world_size: this process and the number of processes.
        pad: wrap around so every process gets the same count (training); without it the
            shards differ by at most one item and each item appears once (evaluation).
    """

    def __init__(
        self, length: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, pad: bool = True
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.pad = pad
        self.per_rank = -(-length // world_size) if pad else len(range(rank, length, world_size))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip its first `start` items of this process (already consumed)."""
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        order = order.tolist()
        padded = order + order[: self.per_rank * self.world_size - self.length] if self.pad else order
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
