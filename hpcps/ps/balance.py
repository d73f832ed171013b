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
``ps.balance_every`` steps (the first time after 9; while the search still has a split to
try, every quarter of that, at least 10 steps) it adds the step times of the split in
force to that split's record (the last 64 kept; its time is their median). Standing on
the best split, it tries a new one that the measured compute times say is clearly
faster (if each worker's time grew in proportion to its sequences) -- the split that
would balance them, or one sequence moved from the worker that computed longest to the
one that computed shortest (if that does not look slower); a trial that does not
measure clearly faster than the best is left for the best again.

Noise: on shared cores one step time can be off by a scheduler slice (ms), so a trial
needs 8 step times and must be 5 % faster than the best to replace it; the best is
re-measured while it stays in force, and another split takes its place only when 5 %
faster than its record. Without that rule (an earlier version explored on from any
split within 5 % of the best) the search drifted across lucky measurements to splits
that gave a 2x-slower straggler 3 or 4 of 16 sequences. On a persistent straggler it
walks to the best split in a few trials and stays there.

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
MIN_SAMPLES = 8          # step times a period needs before it decides anything
KEEP = 64                # step (and compute) times kept per split: its record


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


def choose(split: tuple, best: tuple, tried: dict, candidate: Optional[tuple]) -> tuple:
    """The next split: explore ``candidate`` when it is new and we stand on the ``best``
    split; otherwise go to (or stay on) ``best``."""
    if split == best and candidate is not None and candidate not in tried:
        return candidate
    return best


def new_best(best: Optional[tuple], tried: dict) -> tuple:
    """The best split after a measurement: the fastest one measured, if it is clearly
    (GAIN) faster than the best so far; otherwise the best so far stays."""
    fastest = min(tried, key=tried.get)
    if best is None or tried[fastest] * (1 + GAIN) < tried[best]:
        return fastest
    return best


class SplitSearch:
    """Coordinator: the split in force and the search for a faster one (module doc)."""

    def __init__(self, total: int, workers: int, every: int, start_step: int,
                 split: Optional[Sequence[int]] = None):
        self.total, self.W, self.every = total, workers, every
        self.split = tuple(split) if valid_split(split, total, workers) else \
            tuple(equal_split(total, workers))
        self.best: Optional[tuple] = None
        self.tried: dict[tuple, float] = {}                 # split -> median step time
        self.step_record: dict[tuple, list[float]] = {}
        self.compute_record: dict[tuple, list[list[float]]] = {}
        self.period = every
        # long enough for MIN_SAMPLES step times after the settling steps
        self.trial_steps = max(SETTLE_STEPS + MIN_SAMPLES + 1, every // 4)
        self._reset(start_step)
        # the equal split of a start is usually far off: decide early the first time
        self.decide_at = start_step + SETTLE_STEPS + MIN_SAMPLES

    def _reset(self, step: int) -> None:
        self.measure_from = step + SETTLE_STEPS
        self._clear()

    def _clear(self) -> None:
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

    def _record(self) -> list[float]:
        """Add this period's times to the split's record; returns its median computes."""
        steps = self.step_record.setdefault(self.split, [])
        steps.extend(self.step_times)
        del steps[:-KEEP]
        self.tried[self.split] = statistics.median(steps)
        computes = self.compute_record.setdefault(self.split, [[] for _ in range(self.W)])
        for kept, new in zip(computes, self.compute):
            kept.extend(new)
            del kept[:-KEEP]
        return [statistics.median(c) for c in computes]

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
        compute = self._record()
        best_before = self.best
        self.best = new_best(self.best, self.tried)
        candidate = self._candidate(compute) if self.split == self.best else None
        chosen = choose(self.split, self.best, self.tried, candidate)
        # a period that found nothing faster makes the next one twice as long (up to 8x):
        # once the best split is found, the search mostly stays there. While there is a
        # split to try or to leave, periods are short: a bad guess costs a few steps.
        found = self.best != best_before
        self.period = self.every if found else min(8 * self.every, 2 * self.period)
        searching = chosen != self.split or candidate is not None
        self.decide_at = step + (self.trial_steps if searching else self.period)
        if chosen != self.split:
            self.split = chosen
            self._reset(step)
        else:
            self._clear()
        return self.split
