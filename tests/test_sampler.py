"""Globally defined batches (hpcps/data/sampler.py): sequence i of step t is the same
whatever the split into workers, in RAM or read lazily from the corpus file."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpcps.data.sampler import (
    TRAIN_STREAM,
    VAL_STREAM,
    LMBatcher,
    offsets,
    sequence_keys,
    split_range,
)

pytestmark = pytest.mark.timeout(60)

TOKENS = (np.arange(5000) * 7 % 251).astype(np.uint16)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 50), parts=st.integers(1, 9), step=st.integers(0, 10**6),
       seed=st.integers(0, 2**31))
def test_any_split_gives_the_same_sequences(n, parts, step, seed):
    batcher = LMBatcher(TOKENS, 16, seed)
    whole_x, whole_y = batcher.batch(step, 0, n)
    pieces = [batcher.batch(step, *split_range(n, parts, k)) for k in range(parts)]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in pieces]), whole_x)
    np.testing.assert_array_equal(np.concatenate([y for _, y in pieces]), whole_y)
    assert whole_x.shape == (n, 16) and whole_x.dtype == np.int64


def test_windows_are_corpus_slices_with_targets_shifted_by_one():
    x, y = LMBatcher(TOKENS, 32, 1).batch(3, 0, 8)
    starts = offsets(1, TRAIN_STREAM, 3, 0, 8, len(TOKENS) - 32)
    for row_x, row_y, start in zip(x, y, starts):
        np.testing.assert_array_equal(row_x, TOKENS[start:start + 32])
        np.testing.assert_array_equal(row_y, TOKENS[start + 1:start + 33])


def test_keys_depend_on_seed_stream_step_and_index_only():
    base = sequence_keys(5, TRAIN_STREAM, 10, 0, 8)
    np.testing.assert_array_equal(sequence_keys(5, TRAIN_STREAM, 10, 3, 8), base[3:])
    assert len(set(base.tolist())) == 8
    # negative controls: every input changes the keys
    for other in (sequence_keys(6, TRAIN_STREAM, 10, 0, 8), sequence_keys(5, VAL_STREAM, 10, 0, 8),
                  sequence_keys(5, TRAIN_STREAM, 11, 0, 8)):
        assert not np.any(other == base)


def test_offsets_stay_in_range_and_spread():
    o = offsets(0, TRAIN_STREAM, 0, 0, 20000, 1000)
    assert o.min() >= 0 and o.max() < 1000
    counts = np.bincount(o // 100, minlength=10)
    assert counts.min() > 1700 and counts.max() < 2300  # roughly uniform over 10 bins
    with pytest.raises(ValueError):
        offsets(0, TRAIN_STREAM, 0, 0, 4, 0)


def test_split_range_exact_values():
    assert [split_range(10, 4, k) for k in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [split_range(2, 3, k) for k in range(3)] == [(0, 1), (1, 2), (2, 2)]


def test_lazy_corpus_split_reads_the_same_sequences(make_corpus):
    from hpcps.data.corpus import Corpus
    text = "".join(chr(97 + (i * 13) % 26) for i in range(4000))
    path = make_corpus(text)
    with Corpus.open(str(path)) as corpus:
        split = corpus.split("train")
        in_memory = LMBatcher(split.load(), 24, 9)
        lazy = LMBatcher(split, 24, 9)
        for step in (0, 1, 17):
            a, b = in_memory.batch(step, 2, 7), lazy.batch(step, 2, 7)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


class CountingSplit:
    """A real TokenSplit that records the size of every read the batcher makes."""

    def __init__(self, split):
        self.split = split
        self.n_tokens = split.n_tokens
        self.reads = []

    def read(self, start, stop):
        self.reads.append(stop - start)
        return self.split.read(start, stop)


def test_split_over_in_memory_mb_is_read_a_window_at_a_time(make_corpus):
    """A split larger than data.in_memory_mb is never loaded: the batcher reads T + 1 tokens
    per sequence, so memory does not grow with the corpus."""
    from hpcps.data.corpus import Corpus, TokenSplit
    from hpcps.workloads.gpt import load_split
    path = make_corpus("".join(chr(97 + (i * 7) % 26) for i in range(300_000)))
    with Corpus.open(str(path)) as corpus:
        assert isinstance(load_split(corpus, "train", 0), TokenSplit)        # 540 KB > 0 MB
        assert isinstance(load_split(corpus, "train", 1), np.ndarray)        # control: fits
        counting = CountingSplit(load_split(corpus, "train", 0))
        x, y = LMBatcher(counting, 32, 5).batch(3, 0, 12)
        assert counting.reads == [33] * 12
        reference = LMBatcher(corpus.split("train").load(), 32, 5).batch(3, 0, 12)
        np.testing.assert_array_equal(x, reference[0])
        np.testing.assert_array_equal(y, reference[1])
