"""Sharding the flat buffer over S servers: exact cover, balance, per-shard views of the
layout (decay ranges, init) that add up to the whole, and resharding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcps.model.layout import ParamLayout
from hpcps.ps.sharding import reshard, shard_ranges

pytestmark = pytest.mark.timeout(60)


def layout_from(shapes) -> ParamLayout:
    layout = ParamLayout()
    for i, shape in enumerate(shapes):
        layout.add(f"t{i}", shape, std=0.02 if len(shape) == 2 else 0.0, value=1.0)
    return layout


shape_st = st.one_of(st.tuples(st.integers(1, 9)), st.tuples(st.integers(1, 7), st.integers(1, 9)))


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 100_000), servers=st.integers(1, 64))
def test_shards_cover_every_element_exactly_once(total, servers):
    ranges = shard_ranges(total, servers)
    assert len(ranges) == servers
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert hi == lo                                   # contiguous, no gap, no overlap
    sizes = [hi - lo for lo, hi in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1  # balanced by bytes
    assert sizes == sorted(sizes, reverse=True)           # the remainder goes to the first ones


@settings(max_examples=200, deadline=None)
@given(shapes=st.lists(shape_st, min_size=1, max_size=8), servers=st.integers(1, 12))
def test_shards_cut_tensors_but_every_tensor_is_owned_once(shapes, servers):
    """S may exceed the number of tensors (or be larger than some): tensors get cut, and the
    per-shard pieces, decay ranges and initial values add up to the whole model's."""
    layout = layout_from(shapes)
    ranges = shard_ranges(layout.total, servers)
    owned = {s.name: 0 for s in layout.specs}
    for lo, hi in ranges:
        for spec, a, b in layout.overlapping(lo, hi):
            assert lo <= a < b <= hi
            owned[spec.name] += b - a
    assert owned == {s.name: s.size for s in layout.specs}
    mask = np.concatenate([layout.decay_mask(lo, hi) for lo, hi in ranges])
    np.testing.assert_array_equal(mask, layout.decay_mask())
    init = np.concatenate([layout.init_slice(7, lo, hi) for lo, hi in ranges])
    np.testing.assert_array_equal(init, layout.init_slice(7))


def test_odd_sizes_exact_values():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(1001, 2) == [(0, 501), (501, 1001)]
    assert shard_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # more servers than elements
    with pytest.raises(ValueError):
        shard_ranges(10, 0)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), old=st.integers(1, 9), new=st.integers(1, 9),
       seed=st.integers(0, 2**32 - 1))
def test_reshard_round_trip(total, old, new, seed):
    values = np.random.default_rng(seed).standard_normal(total).astype(np.float32)
    old_ranges = shard_ranges(total, old)
    pieces = [(lo, hi, values[lo:hi].copy()) for lo, hi in old_ranges]
    new_ranges = shard_ranges(total, new)
    moved = reshard(pieces[::-1], new_ranges)   # piece order must not matter
    for (lo, hi), arr in zip(new_ranges, moved):
        np.testing.assert_array_equal(arr, values[lo:hi])
        assert arr.dtype == np.float32
    back = reshard([(lo, hi, a) for (lo, hi), a in zip(new_ranges, moved)], old_ranges)
    np.testing.assert_array_equal(np.concatenate(back), values)


def test_reshard_reports_a_missing_piece():
    values = np.arange(10, dtype=np.float32)
    pieces = [(0, 4, values[0:4]), (7, 10, values[7:10])]  # [4, 7) is missing
    with pytest.raises(ValueError, match=r"cover 7 of the 10 elements of \[0, 10\)"):
        reshard(pieces, [(0, 10)])
    assert [a.tolist() for a in reshard(pieces, [(0, 4), (7, 10)])] == [[0, 1, 2, 3], [7, 8, 9]]
