"""Speed-balanced bsp (``ps.balance = speed``): how a step's global batch is split.

The global batch of a step stays ``train.batch_size x W`` sequences, each a pure
function of (seed, step, index); only *who computes which* changes. Worker w takes
the contiguous items [lo_w, hi_w); the servers weight every push by its tokens, so
the update equals one process with the global batch whatever the split.

Who plans: the coordinator, from what it measures, and it publishes the split of the
next step in control words before the version moves (every worker reads them after
its pull, so all use the same split). A model of each worker's speed (seconds per
sequence, or a line with a fixed part) is not enough: workers that share cores slow
each other down, so taking sequences away from a straggler also speeds up the
others. The planner therefore checks every proposal on the *measured step time*: every
``ps.balance_every`` steps (the first time after 5; while the search still has a split to
try, every quarter of that, at least 6 steps) it notes the median step time of the
split in force; standing on the fastest split measured so far, it tries a new one that the measured compute
times say is clearly faster (if each worker's time grew in proportion to its
sequences) — the split that would balance them, or one sequence moved from the worker
that computed longest to the one that computed shortest (if that does not look slower)
— and otherwise returns to the fastest split measured. Noise alone does not make it
wander: a split must measure 5 % faster to be kept. On a persistent straggler it walks to
the best split in a few periods and stays there; it leaves it again only when a measurement says so.

Restart: the lead's record of every step carries the split published for the next
step (``split``); a resumed run's coordinator publishes the split of the record saved
with the checkpoint, so the resumed steps split exactly as the uninterrupted run's
did until its next re-plan. Another worker count (an elastic restart) starts from
equal slices.
"""

from __future__ import annotations

import heapq
import statistics
from typing import Optional, Sequence

GAIN = 0.05              # a measured split must be 5 % faster to count as faster
SETTLE_STEPS = 1         # steps after a start or a change whose times are not measured
MIN_SAMPLES = 4          # step times a period needs before it decides anything
FIRST_PERIOD = 5         # steps measured before the first decision after a start


def equal_split(total: int, workers: int) -> list[int]:
    base, extra = divmod(total, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


def slice_of(counts: Sequence[int], worker: int) -> tuple[int, int]:
    """Worker ``worker``'s items [lo, hi) of the global batch."""
    lo = sum(counts[:worker])
    return lo, lo + counts[worker]


def valid_split(split, total: int, workers: int) -> bool:
    return (split is not None and len(split) == workers and sum(split) == total
            and min(split) >= 1)


def moved(split: Sequence[int], source: int, target: int) -> Optional[tuple]:
    """``split`` with one sequence moved from ``source`` to ``target`` (None: cannot)."""
    if source == target or split[source] <= 1:
        return None
    out = list(split)
    out[source] -= 1
    out[target] += 1
    return tuple(out)


def predicted_s(split: Sequence[int], per_sequence: Sequence[float]) -> float:
    """The slowest slice if a slice of n costs n x ``per_sequence[w]``."""
    return max(n * cost for n, cost in zip(split, per_sequence))


def fastest_split(total: int, per_sequence: Sequence[float]) -> tuple:
    """Counts summing to ``total`` (at least one each) that minimise the slowest slice if a
    slice of n costs n x ``per_sequence[w]``: give sequences one at a time to the worker
    that would finish it first (ties: the lower index, so the result is deterministic)."""
    counts = [1] * len(per_sequence)
    heap = [(2 * cost, w) for w, cost in enumerate(per_sequence)]
    heapq.heapify(heap)
    for _ in range(total - len(counts)):
        _, w = heapq.heappop(heap)
        counts[w] += 1
        heapq.heappush(heap, ((counts[w] + 1) * per_sequence[w], w))
    return tuple(counts)


def choose(split: tuple, tried: dict, candidate: Optional[tuple]) -> tuple:
    """The next split: explore ``candidate`` when it is new and we stand on the fastest
    split measured so far (within GAIN); otherwise go to the fastest measured split when
    it is clearly faster than ours; otherwise stay."""
    best = min(tried, key=tried.get)
    at_best = tried[split] <= tried[best] * (1 + GAIN)
    if candidate is not None and candidate not in tried and at_best:
        return candidate
    if tried[best] * (1 + GAIN) < tried[split]:
        return best
    return split


class SplitSearch:
    """Coordinator: the split in force and the search for a faster one (module doc)."""

    def __init__(self, total: int, workers: int, every: int, start_step: int,
                 split: Optional[Sequence[int]] = None):
        self.total, self.W, self.every = total, workers, every
        self.split = tuple(split) if valid_split(split, total, workers) else \
            tuple(equal_split(total, workers))
        self.tried: dict[tuple, float] = {}
        self.period = every
        # long enough for MIN_SAMPLES step times after the settling steps
        self.trial_steps = max(SETTLE_STEPS + MIN_SAMPLES + 1, every // 4)
        self._reset(start_step)
        # the equal split of a start is usually far off: decide early the first time
        self.decide_at = start_step + SETTLE_STEPS + max(FIRST_PERIOD, MIN_SAMPLES)

    def _reset(self, step: int) -> None:
        self.measure_from = step + SETTLE_STEPS
        self.compute: list[list[float]] = [[] for _ in range(self.W)]
        self.step_times: list[float] = []

    def observe_push(self, worker: int, seconds: float, step: int) -> None:
        """Worker ``worker`` computed its slice of ``step`` in ``seconds``."""
        if step >= self.measure_from and seconds > 0:
            self.compute[worker].append(seconds)

    def observe_step(self, step: int, seconds: float) -> None:
        """Update ``step`` came ``seconds`` after the previous one."""
        if step >= self.measure_from and seconds > 0:
            self.step_times.append(seconds)

    def _candidate(self, compute: list[float]) -> Optional[tuple]:
        """An untried split to measure next: the one that would balance the computes if each
        worker's time grew in proportion to its sequences; when that one is tried, a
        sequence from the worker that computed longest (ties: the one with the dearest
        sequences, or the next longest if tried) to the one that computed shortest."""
        per_sequence = [c / n for c, n in zip(compute, self.split)]
        now = predicted_s(self.split, per_sequence)
        proportional = fastest_split(self.total, per_sequence)
        if proportional not in self.tried and predicted_s(proportional, per_sequence) * (1 + GAIN) < now:
            return proportional
        # a fixed part of each step makes the proportional model too shy of taking the last
        # sequences from a straggler: a single move need only not look slower
        source = max(range(self.W), key=lambda w: (compute[w], per_sequence[w]))
        candidate = moved(self.split, source, compute.index(min(compute)))
        if candidate is not None and candidate not in self.tried \
                and predicted_s(candidate, per_sequence) <= now:
            return candidate
        return None

    def next_split(self, step: int) -> tuple:
        """The split of ``step`` (asked while update ``step - 1`` is applied)."""
        if step < self.decide_at or len(self.step_times) < MIN_SAMPLES \
                or not all(self.compute):
            return self.split
        measured = statistics.median(self.step_times)
        best_before = min(self.tried.values(), default=float("inf"))
        old = self.tried.get(self.split)
        self.tried[self.split] = measured if old is None else 0.5 * (old + measured)
        compute = [statistics.median(c) for c in self.compute]
        candidate = self._candidate(compute)
        chosen = choose(self.split, self.tried, candidate)
        # a period that found nothing faster makes the next one twice as long (up to 8x):
        # once the best split is found, the search mostly stays there. While there is a
        # split left to try, periods are short: a bad guess costs a few steps, and so does
        # the return from it.
        found = measured * (1 + GAIN) < best_before
        self.period = self.every if found else min(8 * self.every, 2 * self.period)
        searching = candidate is not None or (chosen != self.split and chosen not in self.tried)
        self.decide_at = step + (self.trial_steps if searching else self.period)
        if chosen != self.split:
            self.split = chosen
            self._reset(step)
        else:
            self.compute = [[] for _ in range(self.W)]
            self.step_times = []
        return self.split
