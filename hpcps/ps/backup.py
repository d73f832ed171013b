"""bsp with backup workers (``ps.backup_workers = b``): when a step may be applied, and
what happens to the pushes that come late.

Step t is applied once W − b pushes of step t are in (and every worker has pushed
step t − 1, see below). A push of step t − 1 that arrives after update t − 1 is **not
thrown away**: the server takes it out of its slot at once (so its worker can push
step t into the slot), keeps it weighted by its tokens in a *carry* accumulator, and
adds it to update t, where its staleness (1) is counted. Every sequence of the global
batch is applied exactly once, and no computed gradient is wasted.

Why not hand the late sequences to another worker instead? The straggler cannot be
interrupted in the middle of its backward: its work would be thrown away, and the
step that takes over its sequences would be uneven. Folding them one step later
costs one step of staleness on b/W of the batch at most.

No worker may fall two steps behind: step t is applied only when every worker's push
of step t − 1 has been applied or carried. A *persistent* straggler therefore still
paces the job (speed balance, ``ps.balance = speed``, is the remedy for that);
backup workers absorb *transient* slowness.

Sync points: before a checkpoint or the end (boundaries every rank knows in advance)
the step waits for all W pushes, so nothing is carried across. At a stop agreed on a
signal, late pushes still carried are applied in one extra update before the
checkpoint (the version does not move), so none is lost.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def step_is_ready(version: int, fresh: int, pushed_through: Sequence[int], backup: int,
                  need_all: bool) -> bool:
    """May update ``version`` be applied with ``fresh`` pushes of its step in?
    ``pushed_through[p]``: the last step of pusher p applied or carried."""
    if any(done < version - 1 for done in pushed_through):
        return False   # someone would fall two steps behind
    needed = len(pushed_through) if need_all else len(pushed_through) - backup
    return fresh >= needed


def sync_boundary_ahead(cfg, step: int, start_step: int) -> bool:
    """Is boundary ``step`` a sync point every rank knows in advance (checkpoint or end)?
    (Mirrors ``Trainer.checkpoint_due``.)"""
    every = cfg.checkpoint.every
    checkpoint = bool(every) and step % every == 0 and step != start_step and step > 0
    return checkpoint or step >= cfg.train.max_steps


class Carry:
    """Late pushes kept for the next update: sum of weight * gradient, and their totals."""

    def __init__(self, n: int):
        self.acc = np.zeros(n, dtype=np.float32)
        self.weight = 0.0
        self.loss = 0.0      # sum of weight * loss
        self.items = 0
        self.count = 0

    def add(self, weight: float, loss: float, items: int) -> None:
        """Book a push whose weight * gradient the caller has added into ``acc``."""
        self.weight += weight
        self.loss += weight * loss
        self.items += items
        self.count += 1

    def clear(self) -> None:
        self.acc.fill(0.0)
        self.weight = self.loss = 0.0
        self.items = self.count = 0
