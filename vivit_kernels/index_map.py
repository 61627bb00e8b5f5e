"""The index map of an attention group: which tokens of a head a group holds.

A head's N = P + T * S tokens (P prefix tokens, then a T x S grid in `layout` order) fall into
`groups` groups; member i of group g is token base + g * group_stride + i * member_stride, and
each group also holds the `prefix` tokens 0 .. prefix - 1 (a spatial head's class tokens) ahead
of its `length` members. The fields and their order are the same in the Triton launchers
(vivit_kernels/triton/attention.py) and the C++ kernels (csrc/attention.cpp):

    mode      groups  length  group_stride  member_stride  base  prefix   (time-major)
    joint     1       N       0             1              0     0
    spatial   T       S       S             1              P     P        (the prefix and frame g)
    temporal  S       T       1             S              P     0        (the T frames of position g)

Space-major swaps the two strides of the spatial and temporal maps. A temporal head's prefix
tokens attend among themselves: one more group, `prefix_group`.
"""

from __future__ import annotations

from typing import NamedTuple

from .checks import AttentionShape


class IndexMap(NamedTuple):
    groups: int
    length: int
    group_stride: int
    member_stride: int
    base: int
    prefix: int

    @property
    def row_length(self) -> int:
        """Rows of one group: its prefix tokens and its members."""
        return self.prefix + self.length

    @classmethod
    def of(cls, shape: AttentionShape, mode: str | None = None) -> IndexMap:
        """The grid groups of `shape` in `mode` ("joint", "spatial" or "temporal"; default: the shape's)."""
        mode = shape.mode if mode is None else mode
        T, S, P = shape.frames, shape.tokens_per_frame, shape.prefix
        time_major = shape.layout == "time_major"
        if mode == "joint":
            return cls(1, shape.tokens, 0, 1, 0, 0)
        if mode == "spatial":
            return cls(T, S, S, 1, P, P) if time_major else cls(T, S, 1, T, P, P)  # mutant: tri-space-major
        if mode == "temporal":
            return cls(S, T, 1, S, P, 0) if time_major else cls(S, T, T, 1, P, 0)
        raise ValueError(f"IndexMap.of: mode must be 'joint', 'spatial' or 'temporal', got {mode!r}")

    @classmethod
    def prefix_group(cls, shape: AttentionShape) -> IndexMap:
        """A temporal head's prefix tokens, one group of their own."""
        return cls(1, shape.prefix, 0, 1, 0, 0)
