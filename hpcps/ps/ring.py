"""The landing slots of a bsp server shard: k slots shared by P pushers (``ps.slots``).

A server that kept one receive slot per pusher would hold 4 bytes x shard elements per
worker (GPT-2 774M with 7 workers on one server: 22 GB of slots). Instead the pushes of a
bsp step take turns in k slots, in a fixed order: push number ``n = step x P + pusher``
(its *ticket*) lands in slot ``n mod k``, and may be written only once the server folded
push ``n - k`` from that slot into the step's sum and freed it. The server folds tickets
in order, so the step's sum adds the same pushes in the same order whatever the arrival
order: a run is deterministic (a resumed run is bit-identical) for every k.

Each slot has one control word, written with REPLACE only: ``2n`` means the slot is free
for ticket n, ``2n + 1`` that it holds ticket n's push (written by the pusher after its
data is complete at the server). No ticket ever waits for a later one (a pusher waits
only for tickets k, 2k, ... before its own, and tickets of earlier steps were folded
before the version the pusher pulled was published), so the turns cannot deadlock.

With k = P the ticket of pusher p always lands in slot p and the slot is free by the
time the pusher pulled the step's params: the pusher never asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotRing:
    """Ticket arithmetic shared by the pushers and the server (see the module docstring)."""
    n_slots: int      # k
    n_pushers: int    # P

    def ticket(self, step: int, pusher: int) -> int:
        """The push number of ``pusher``'s push of ``step``."""
        return step * self.n_pushers + pusher

    def slot(self, ticket: int) -> int:
        return ticket % self.n_slots

    @staticmethod
    def free_word(ticket: int) -> int:
        """A slot's word while it waits for ``ticket``'s push."""
        return 2 * ticket

    @staticmethod
    def full_word(ticket: int) -> int:
        """A slot's word once it holds ``ticket``'s push."""
        return 2 * ticket + 1

    @property
    def always_free(self) -> bool:
        """One slot per pusher: a pusher's slot is free whenever it may push (see above)."""
        return self.n_slots == self.n_pushers

    def initial_words(self, version: int) -> np.ndarray:
        """Every slot's word when the server starts (or resumes) at ``version``: free for
        the first ticket of that step or later that lands in it."""
        first = version * self.n_pushers
        return np.array([self.free_word(first + (j - first) % self.n_slots)
                         for j in range(self.n_slots)], dtype=np.int64)


class StepSum:
    """A bsp step's pushes folded so far on one server: the weighted sum itself lives in the
    server's ``acc``; here its count, total weight, weighted loss and items, and (one pusher,
    plain fp32) the slot whose push the update reads in place instead."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.count = 0
        self.weight = 0.0
        self.loss = 0.0
        self.items = 0
        self.in_place: tuple | None = None   # (fp32 view of the slot's payload, slot, ticket)

    def add(self, weight: float, loss: float, items: int) -> None:
        self.count += 1
        self.weight += weight
        self.loss += weight * loss
        self.items += items
