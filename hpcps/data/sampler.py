"""Globally defined batches: the start offset of sequence ``i`` of step ``t`` is a
pure function of ``(seed, stream, t, i)``.

Nothing depends on how many workers there are: a worker takes the contiguous
slice ``[lo, hi)`` of the global batch. That is what makes BSP with W workers of
batch b equal one process with batch W*b, and lets a restart on another worker
count continue the same stream.
"""

from __future__ import annotations

import numpy as np

TRAIN_STREAM = 0
VAL_STREAM = 1
DROPOUT_STREAM = 2
MASK_STREAM = 3     # for workloads that draw per-sequence randomness (MLM masking, negatives)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sequence_keys(seed: int, stream: int, step: int, lo: int, hi: int) -> np.ndarray:
    """64-bit keys of sequences [lo, hi) of ``step``: independent of the batch split."""
    base = _splitmix64(np.array([seed], dtype=np.uint64))
    base = _splitmix64(base ^ np.uint64(stream))
    base = _splitmix64(base ^ np.uint64(step))
    idx = np.arange(lo, hi, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _splitmix64(base ^ (idx * np.uint64(0xD1B54A32D192ED03)))


def offsets(seed: int, stream: int, step: int, lo: int, hi: int, n_choices: int) -> np.ndarray:
    """Uniform start offsets in [0, n_choices) for sequences [lo, hi) of ``step``.
    The modulo bias is below 2**-40 for any realistic corpus."""
    if n_choices <= 0:
        raise ValueError("n_choices must be positive")
    return (sequence_keys(seed, stream, step, lo, hi) % np.uint64(n_choices)).astype(np.int64)


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous share ``index`` of ``n`` items over ``parts`` (first ones get the remainder)."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


class LMBatcher:
    """(x, y) windows of ``block_size`` tokens from a token array, nanoGPT style:
    x = data[o:o+T], y = data[o+1:o+T+1] with o uniform in [0, len - T)."""

    def __init__(self, tokens, block_size: int, seed: int, stream: int = TRAIN_STREAM):
        self.tokens = tokens            # np.ndarray or TokenSplit-like with read(a, b)
        self.block_size = block_size
        self.seed = seed
        self.stream = stream
        self.n = len(tokens) if hasattr(tokens, "__len__") else tokens.n_tokens
        self._in_memory = isinstance(tokens, np.ndarray)
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def batch(self, step: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_size
        starts = offsets(self.seed, self.stream, step, lo, hi, self.n - T)
        if self._in_memory:
            rows = self.tokens[starts[:, None] + self._window[None, :]].astype(np.int64)
        else:
            rows = np.stack([np.asarray(self.tokens.read(int(s), int(s) + T + 1), dtype=np.int64)
                             for s in starts]) if len(starts) else np.zeros((0, T + 1), np.int64)
        return rows[:, :-1], rows[:, 1:]
