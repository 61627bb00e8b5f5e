"""vivit_kernels/index_map.py: each mode's groups, as the Triton launchers and the C++ kernels read them."""

import pytest

from vivit_kernels.checks import AttentionShape
from vivit_kernels.index_map import IndexMap


def members(index_map: IndexMap) -> list[list[int]]:
    """Each group's tokens, its prefix tokens first."""
    m = index_map
    return [
        list(range(m.prefix)) + [m.base + g * m.group_stride + i * m.member_stride for i in range(m.length)]
        for g in range(m.groups)
    ]


def test_fields_are_named_in_the_kernels_order():
    assert IndexMap._fields == ("groups", "length", "group_stride", "member_stride", "base", "prefix")
    assert IndexMap(3, 4, 5, 6, 7, 1).row_length == 5


@pytest.mark.parametrize("layout", ["time_major", "space_major"])
@pytest.mark.parametrize("prefix", [0, 2])
def test_groups_are_the_modes_token_sets(layout, prefix):
    T, S, P = 3, 4, prefix
    shape = AttentionShape.of((1, 2, P + T * S, 8), T, "split", prefix=P, layout=layout)

    def token(t, s):
        return P + (t * S + s if layout == "time_major" else s * T + t)

    N = P + T * S
    assert members(IndexMap.of(shape, "joint")) == [list(range(N))]
    frames = [list(range(P)) + [token(t, s) for s in range(S)] for t in range(T)]
    assert members(IndexMap.of(shape, "spatial")) == frames
    assert members(IndexMap.of(shape, "temporal")) == [[token(t, s) for t in range(T)] for s in range(S)]
    assert members(IndexMap.prefix_group(shape)) == [list(range(P))]


def test_mode_defaults_to_the_shapes_and_split_is_not_one_map():
    shape = AttentionShape.of((1, 2, 12, 8), 3, "temporal")
    assert IndexMap.of(shape) == IndexMap.of(shape, "temporal") == IndexMap(4, 3, 1, 4, 0, 0)
    with pytest.raises(ValueError, match="mode"):
        IndexMap.of(AttentionShape.of((1, 2, 12, 8), 3, "split"))
