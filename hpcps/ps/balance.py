"""Speed-balanced bsp (``ps.balance = speed``): how a step's global batch is split.

The global batch of a step stays ``train.batch_size x W`` sequences, each a pure
function of (seed, step, index); only *who computes which* changes. Worker w takes
the contiguous items [lo_w, hi_w); the servers weight every push by its tokens, so
the update equals one process with the global batch whatever the split.

Who plans: every worker, from the same inputs. The coordinator keeps a moving average
of each worker's compute seconds per sequence (from the push headers) and publishes it
with every bsp step, before the version moves. At a re-plan step t (t a multiple of
``ps.balance_every``) every worker reads those averages after pulling version t —
nobody can have pushed step t yet, so all read the same bits — and computes the same
split with ``plan_split``. A split is kept until the next re-plan step, and only
replaced when the new one is predicted to be clearly faster (no flapping on noise).

Restart: the lead's record of every step carries the split and the averages it saw
(``split``, ``item_ms``); a resumed run re-derives the split of its first step from the
record saved with the checkpoint, so it splits exactly as the uninterrupted run would
have at that step. Another worker count (an elastic restart, a worker joining or
leaving) starts from equal slices and re-plans at the next re-plan step.
"""

from __future__ import annotations

import heapq
from typing import Optional, Sequence

EMA_SHARE = 0.3          # weight of the newest measurement in the moving average
SWITCH_GAIN = 0.03       # replace a split only when the new one is predicted >= 3 % faster


def equal_split(total: int, workers: int) -> list[int]:
    base, extra = divmod(total, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


def predicted_step_s(counts: Sequence[int], item_seconds: Sequence[float]) -> float:
    """A bsp step lasts as long as its slowest slice."""
    return max(n * s for n, s in zip(counts, item_seconds))


def fastest_split(total: int, item_seconds: Sequence[float]) -> list[int]:
    """Counts summing to ``total`` (at least one each) that minimise the slowest slice's
    time: give sequences one at a time to the worker that would finish it first (exact for
    equal-cost sequences). Ties go to the lower worker index: deterministic."""
    W = len(item_seconds)
    counts = [1] * W
    heap = [(2 * item_seconds[w], w) for w in range(W)]
    heapq.heapify(heap)
    for _ in range(total - W):
        _, w = heapq.heappop(heap)
        counts[w] += 1
        heapq.heappush(heap, ((counts[w] + 1) * item_seconds[w], w))
    return counts


def plan_split(total: int, item_seconds: Sequence[float],
               current: Optional[Sequence[int]] = None) -> list[int]:
    """The split for the next steps: ``current`` unless the fastest split is predicted to
    be ``SWITCH_GAIN`` faster, or the measurements are incomplete."""
    W = len(item_seconds)
    if current is not None and (len(current) != W or sum(current) != total):
        current = None
    if not all(s > 0 for s in item_seconds):
        return list(current) if current is not None else equal_split(total, W)
    best = fastest_split(total, item_seconds)
    if current is not None and (predicted_step_s(best, item_seconds) * (1 + SWITCH_GAIN)
                                >= predicted_step_s(current, item_seconds)):
        return list(current)
    return best


def slice_of(counts: Sequence[int], worker: int) -> tuple[int, int]:
    """Worker ``worker``'s items [lo, hi) of the global batch."""
    lo = sum(counts[:worker])
    return lo, lo + counts[worker]


class SpeedAverages:
    """Coordinator: moving average of each worker's compute seconds per sequence."""

    def __init__(self, workers: int):
        self.values = [0.0] * workers

    def add(self, worker: int, seconds: float, items: int) -> None:
        if seconds <= 0 or items <= 0:
            return
        per_item = seconds / items
        old = self.values[worker]
        self.values[worker] = per_item if old == 0 else (1 - EMA_SHARE) * old + EMA_SHARE * per_item
