"""Simulated stragglers for experiments: how many times slower a worker computes a step.

``ps.straggler`` ('RANK:FACTOR,...') slows named ranks down for the whole run (a
persistent straggler). ``ps.straggler_pattern`` slows workers down for a while:

- ``random:F``: at its own step i, worker w is F times slower when a seeded draw
  over the workers for step i picks w. In bsp (every worker at the same step) that
  is exactly one slow worker per step; in asp and ssp each worker is slow on about
  1/W of its own steps, the same share of slowness.
- ``burst:K:F``: the same draw once per block of K steps (slowdowns in bursts).

A slow step sleeps ``(F - 1)`` times the compute time it just measured, so the
slowdown scales with the work the step really had (a speed-balanced worker with a
smaller slice sleeps less).
"""

from __future__ import annotations

import numpy as np

STRAGGLE_STREAM = 0x5354   # seeds the draws apart from every data stream


def persistent_factor(spec: str, rank: int) -> float:
    """``ps.straggler`` ('RANK:FACTOR,...'): how many times slower this rank computes."""
    for part in filter(None, spec.split(",")):
        r, _, factor = part.partition(":")
        if int(r) == rank:
            return float(factor)
    return 1.0


class Straggler:
    """How much slower one worker computes its own step i (1.0: full speed)."""

    def __init__(self, cfg, world_rank: int, worker_index: int, n_workers: int):
        self.base = persistent_factor(cfg.ps.straggler, world_rank)
        self.seed = cfg.train.seed
        self.w, self.W = worker_index, n_workers
        self.block, self.factor = 0, 1.0
        kind, _, rest = cfg.ps.straggler_pattern.partition(":")
        if kind == "random":
            self.block, self.factor = 1, float(rest)
        elif kind == "burst":
            steps, _, factor = rest.partition(":")
            self.block, self.factor = int(steps), float(factor)

    def picked(self, step: int) -> int:
        """The worker the pattern slows down at ``step`` (-1: none)."""
        if not self.block:
            return -1
        rng = np.random.default_rng([self.seed, STRAGGLE_STREAM, step // self.block])
        return int(rng.integers(self.W))

    def factor_at(self, step: int) -> float:
        factor = self.base
        if self.block and self.picked(step) == self.w:
            factor *= self.factor
        return factor
