"""Waiting without burning a core, and noticing peers that went silent.

Every wait in the parameter server is a poll loop: check a condition through
MPI atomics, do periodic duties (heartbeat, peer watch), then back off: a few
yields, then sleeps doubling up to ``cap``. An idle server or a worker waiting
for a BSP step therefore uses a few percent of a core, not all of it.

A rank that owns window memory passes ``progress`` (a cheap MPI call): over a
network module, other ranks' atomics on its windows complete only while it is
inside MPI, so its sleeps are cut into slices of at most ``PROGRESS_SLICE`` with
a call to ``progress`` between them (docs/protocol.md, "Progress").
"""

from __future__ import annotations

import time
from typing import Callable, Optional

NAP_SLICE = 0.05  # longest single sleep: periodic duties (heartbeats, watches) keep running
PROGRESS_SLICE = 2e-4  # longest sleep without entering MPI on a rank that owns window memory


def sleep_with_progress(seconds: float, progress: Optional[Callable[[], None]]) -> None:
    """Sleep ``seconds``; with ``progress``, enter MPI at least every ``PROGRESS_SLICE``."""
    if progress is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while True:
        progress()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, PROGRESS_SLICE))


class ProgressPacer:
    """``progress`` at most once per ``every`` seconds, for loops of local work (an optimizer
    update in chunks, decoding pushes) on a rank whose windows others are using."""

    def __init__(self, progress: Callable[[], None], every: float = PROGRESS_SLICE):
        self.progress, self.every = progress, every
        self.next = 0.0

    def __call__(self) -> None:
        now = time.perf_counter()
        if now >= self.next:
            self.progress()
            self.next = now + self.every


class Backoff:
    """The pause between two polls of one wait (see the module docstring)."""

    def __init__(self, cap: float = 0.0005, spins: int = 4,
                 progress: Optional[Callable[[], None]] = None):
        self.cap = cap
        self.spins = spins
        self.progress = progress
        self.reset()

    def reset(self, expect: float = 0.0) -> None:
        """Start a new wait. ``expect``: seconds the awaited event is surely still away
        (see ``WaitHistory``); they are slept through in a few long naps, then polling
        starts fine again, so the event is noticed soon after it happens without
        thousands of wake-ups that would take the core from a process computing on it."""
        self.count = 0
        self.delay = 2e-5
        self.ahead = max(0.0, expect)

    def pause(self) -> None:
        if self.ahead > 0:
            nap = min(self.ahead, NAP_SLICE)
            sleep_with_progress(nap, self.progress)
            self.ahead -= nap
            return
        self.count += 1
        if self.count <= self.spins:
            if self.progress is not None:
                self.progress()
            time.sleep(0)  # yield the core to a compute process sharing it
            return
        sleep_with_progress(self.delay, self.progress)
        self.delay = min(self.cap, self.delay * 2)


def wait_until(condition: Callable[[], bool], duties: Callable[[], None],
               backoff: Optional[Backoff] = None) -> None:
    """Poll ``condition``, running ``duties`` and backing off between polls."""
    backoff = backoff or Backoff()
    while not condition():
        duties()
        backoff.pause()


class WaitHistory:
    """Durations of the last few waits for a recurring event (a bsp step's pushes, the
    server's update). ``expect()`` is a safe part of the shortest recent one: 0 until
    there is history, and a wait that ends early only costs its fine polling."""

    def __init__(self, keep: int = 4, share: float = 0.7):
        self.keep, self.share = keep, share
        self.recent: list[float] = []

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        if len(self.recent) > self.keep:
            self.recent.pop(0)

    def expect(self) -> float:
        return self.share * min(self.recent) if len(self.recent) == self.keep else 0.0


class Every:
    """True at most once per ``period`` seconds (cheap periodic duties in hot loops)."""

    def __init__(self, period: float):
        self.period = period
        self.next = 0.0

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now >= self.next:
            self.next = now + self.period
            return True
        return False


class PeerWatch:
    """Last time each peer's heartbeat counter changed, in local monotonic time."""

    def __init__(self, peers, warn_after: float, dead_after: float):
        now = time.monotonic()
        self.warn_after, self.dead_after = warn_after, dead_after
        self.last_value = {p: None for p in peers}
        self.last_change = {p: now for p in peers}
        self.silent: set = set()

    def observe(self, peer, value: int, now: float | None = None) -> str:
        """'ok', 'silent' (newly past warn_after), 'back' (silent peer spoke again), or ''."""
        now = time.monotonic() if now is None else now
        if value != self.last_value[peer]:
            self.last_value[peer] = value
            self.last_change[peer] = now
            if peer in self.silent:
                self.silent.discard(peer)
                return "back"
            return "ok"
        if peer not in self.silent and now - self.last_change[peer] > self.warn_after:
            self.silent.add(peer)
            return "silent"
        return ""

    def silent_for(self, peer, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return now - self.last_change[peer]

    def is_dead(self, peer, now: float | None = None) -> bool:
        return self.silent_for(peer, now) > self.dead_after
