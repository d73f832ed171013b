"""The worker half of the coordination protocol, and the sync-point meeting of all ranks.

Control words live on the coordinator (server 0), see docs/protocol.md:

- stop agreement: a rank that got SIGUSR1/SIGTERM sets STOP_REQUEST; every
  worker then proposes the first step boundary it can still stop at and waits
  there until all workers have proposed; all stop at the largest proposal, so no
  worker is ever past it. A worker answers the request from *every* wait (its
  ``duties``), not only between steps: a worker already waiting in a bsp pull for
  step t, or parked at a checkpoint of step t, cannot propose t, and if it only
  answered between steps the others would wait for its proposal while it waits
  for them.
- ssp: before step c, wait until every non-excluded worker's clock >= c - s.
  With a sample budget the clock is the worker's own count of pushes, and the
  wait also ends once the batches before the next sync point are all handed out
  (a worker parked there will not push again before the meeting).
- sync points (checkpoint, stop, end): park at the step, wait for the coordinator
  to open a sync epoch (all workers parked, servers drained), then ``meet``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np

from hpcps.errors import EXIT_PEER_DEAD
from hpcps.ps import control as C
from hpcps.ps.control import HIST_BINS, i2f
from hpcps.ps.shards import ShardSet
from hpcps.runtime import signals
from hpcps.runtime.mpi import abort, say
from hpcps.runtime.polled import PolledComm
from hpcps.runtime.wait import Backoff, Every, PeerWatch, WaitHistory, wait_until

SaveHook = Callable[[dict, PolledComm], None]
"""``save(reason, comm)``: this rank's part of the collective checkpoint of a sync point,
with ``comm`` (a polled communicator) for the checkpoint's own collectives."""


def meet(shards: ShardSet, reason: Optional[dict], duties: Callable[[], None],
         save: Optional[SaveHook] = None) -> dict:
    """Every rank meets here once all workers are parked and the servers drained; returns
    the lead worker's reason. Every collective in here (the checkpoint's included) polls and
    runs ``duties`` (heartbeats, watches) while it waits: a rank stopped after parking
    would otherwise hang all the others."""
    roles, wins = shards.roles, shards.wins
    comm = PolledComm(roles.comm, duties)
    comm.Barrier()
    reason = comm.bcast(reason, root=roles.lead_worker)
    if reason.get("checkpoint") and save is not None:
        save(reason, comm)
    if roles.world_rank == roles.servers[0]:
        L = wins.ctl_layout
        wins.write_block(roles.world_rank, L.parked, np.zeros(L.n_workers, dtype=np.int64))
    comm.Barrier()  # nobody re-checks the parking words before they are cleared
    return reason


TRACE_ENV = "HPCPS_PS_TRACE"


class EventTrace:
    """Optional per-worker protocol log for tests: with ``HPCPS_PS_TRACE=DIR`` set, worker w
    appends ``{"ev": "start"|"push", "step": c, "t": monotonic seconds}`` lines to
    DIR/worker{w}.jsonl. "start" is stamped after the consistency wait let step c begin,
    "push" before the clock of step c is published, so replaying the logs in time order
    can only under-count other workers' clocks, never over-count them."""

    def __init__(self, worker: int):
        folder = os.environ.get(TRACE_ENV, "")
        self.fh = None
        if folder:
            os.makedirs(folder, exist_ok=True)
            self.fh = open(os.path.join(folder, f"worker{worker}.jsonl"), "w", buffering=1,
                           encoding="utf-8")

    def event(self, kind: str, step: int, **extra) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps({"ev": kind, "step": step, "t": time.monotonic(), **extra})
                          + "\n")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class WorkerCoordination:
    """One worker's side of the control protocol: liveness (heartbeats, watching the
    servers), stop agreement, the ssp bound, parking at sync points, and the statistics
    the coordinator publishes. ``duties`` is what every wait of this worker runs."""

    def __init__(self, cfg, shards: ShardSet):
        roles, wins = shards.roles, shards.wins
        self.cfg, self.shards, self.roles, self.wins = cfg, shards, roles, wins
        self.mode = roles.mode
        self.w, self.W = roles.worker_index, roles.n_workers
        self.servers = roles.servers
        self.coord = roles.servers[0]
        self.L = wins.ctl_layout
        self.proposal = 0           # step + 1 once proposed
        self.stop_at: Optional[int] = None
        self.stop_sent = False
        self.sync_epoch = 0
        # the earliest boundary this worker can still stop at while it waits outside
        # should_stop (None inside should_stop, which proposes by itself)
        self.next_boundary: Optional[int] = 0
        self.watch = PeerWatch(range(len(self.servers)), cfg.ps.heartbeat_timeout,
                               cfg.ps.dead_timeout)
        self.watch_tick = Every(0.5)
        self.beat = Every(0.2)
        self.stop_tick = Every(0.001)
        self.hist_seen = np.zeros(HIST_BINS, dtype=np.int64)
        self.applied_seen = 0
        self.stats_waits = WaitHistory()  # bsp lead: push -> the step's published stats
        self.trace = EventTrace(self.w)
        self.lead: Optional[int] = None   # ssp: how far ahead of the slowest the last wait let us

    # -- duties of every wait ----------------------------------------------------------
    def duties(self) -> None:
        """Heartbeat to the coordinator; watch the servers; answer a stop request."""
        now = time.monotonic()
        if self.beat.due(now):
            self.wins.add(self.coord, self.L.worker_hb + self.w, 1)
        if self.watch_tick.due(now):
            self._watch_servers(now)
        if self.stop_tick.due(now):
            self._answer_stop()

    def _watch_servers(self, now: float) -> None:
        for s, rank in enumerate(self.servers):
            state = self.watch.observe(s, self.wins.read(rank, C.HEARTBEAT), now)
            if state == "silent":
                say(f"hpcps: warning: server rank {rank} ({self.roles.hosts[rank]}) silent for "
                    f"{self.watch.silent_for(s, now):.1f} s", rank=self.roles.world_rank)
            if self.watch.is_dead(s, now):
                abort(self.roles.comm, EXIT_PEER_DEAD,
                      f"server rank {rank} ({self.roles.hosts[rank]}) silent for "
                      f"{self.watch.silent_for(s, now):.0f} s (ps.dead_timeout = "
                      f"{self.cfg.ps.dead_timeout:g}); aborting the job")

    def _request_stop_if_signalled(self) -> None:
        if signals.stop_requested() and not self.stop_sent:
            self.wins.write(self.coord, C.STOP_REQUEST, 1)
            self.stop_sent = True

    def _propose(self, boundary: int) -> None:
        self.proposal = boundary + 1
        self.wins.write(self.coord, self.L.proposal + self.w, self.proposal)

    def _answer_stop(self) -> None:
        self._request_stop_if_signalled()
        if (self.next_boundary is not None and not self.proposal
                and self.wins.read(self.coord, C.STOP_REQUEST)):
            self._propose(self.next_boundary)

    def wait_until(self, condition: Callable[[], bool], backoff: Optional[Backoff] = None) -> None:
        wait_until(condition, self.duties, backoff)

    # -- before a step -----------------------------------------------------------------
    def _read_coord(self) -> dict:
        lo, hi = self.L.coord_block
        block = self.wins.read_block(self.coord, lo, hi)

        def part(start):
            return block[start - lo:start - lo + self.W]
        return {"stop": int(block[C.STOP_REQUEST - lo]), "clock": part(self.L.clock),
                "excluded": part(self.L.excluded), "proposal": part(self.L.proposal),
                "claimed": int(block[C.CLAIMED - lo])}

    def should_stop(self, step: int, clock: Optional[int] = None,
                    claims_end: Optional[Callable[[Optional[int]], int]] = None) -> bool:
        """Wait as the protocol says before ``step``; True when every worker stops here.
        Sample budget: ``step`` is the boundary this worker can still stop at, ``clock`` its
        pushes so far, and ``claims_end(stop_at)`` the CLAIMED count at which the batches
        before the next sync point (or the agreed stop) are all handed out."""
        self.next_boundary = None
        clock = step if clock is None else clock
        backoff = Backoff()
        while True:
            self._request_stop_if_signalled()
            state = self._read_coord()
            if state["stop"] and not self.proposal:
                self._propose(step)
                state["proposal"][self.w] = self.proposal
            waiting = False
            if self.proposal and self.stop_at is None:
                if np.all(state["proposal"] > 0):
                    self.stop_at = int(state["proposal"].max()) - 1
                elif step + 1 >= self.proposal:
                    waiting = True  # never pass our proposal before everyone has proposed
            if self.stop_at is not None and step >= self.stop_at:
                return True
            lead = None
            if not waiting and self.mode == "ssp":
                clocks = state["clock"].copy()
                clocks[self.w] = clock
                live = state["excluded"] == 0
                live[self.w] = True
                lead = clock - int(clocks[live].min())
                waiting = lead > self.cfg.ps.staleness
                if waiting and claims_end is not None and state["claimed"] >= claims_end(self.stop_at):
                    waiting = False   # nothing left to claim: go and park, do not wait
            if not waiting:
                self.lead = lead
                if claims_end is None:   # with a sample budget: once the claim is valid
                    self.trace.event("start", clock, lead=lead)
                self.next_boundary = step + 1
                return False
            self.duties()
            backoff.pause()

    def claimed(self, step: int) -> None:
        """Sample budget: this worker now computes a batch of global step ``step``, so the
        earliest boundary it can still stop at is the next one."""
        self.next_boundary = step + 1

    def started(self, clock: int) -> None:
        """Sample budget: the claim was valid, the worker computes its push number ``clock``
        (a void claim is no step: it is not traced)."""
        self.trace.event("start", clock, lead=self.lead)

    def agreed_stop(self, step: int) -> Optional[int]:
        """Sample budget: the agreed stop step, if a stop is agreed. A worker that proposed a
        boundary and now holds a batch of ``step`` at or past it waits for every proposal
        first (it must not pass its own proposal before the agreement)."""
        backoff = Backoff()
        while self.stop_at is None and self.proposal and step + 1 >= self.proposal:
            state = self._read_coord()
            if np.all(state["proposal"] > 0):
                self.stop_at = int(state["proposal"].max()) - 1
                break
            self.duties()
            backoff.pause()
        return self.stop_at

    def pushed(self, step: int, clock: Optional[int] = None) -> None:
        """Step ``step`` was pushed: publish the clock the ssp bound reads (the pushes this
        worker has made: ``step + 1`` when all step together)."""
        if clock is None:
            clock = step + 1
            self.trace.event("push", step)
        else:   # sample budget: the trace's step is the worker's own, plus the batch's
            self.trace.event("push", clock - 1, batch_step=step)
        if self.mode == "ssp":
            self.wins.write(self.coord, self.L.clock + self.w, clock)

    # -- sync points -------------------------------------------------------------------
    def park_and_meet(self, step: int, reason: dict, save: Optional[SaveHook]) -> dict:
        """Park at ``step``, wait for the coordinator's sync epoch, meet every rank; returns
        the lead worker's reason, which every rank follows."""
        self.wins.write(self.coord, self.L.parked + self.w, step + 1)
        self.wait_until(lambda: self.wins.read(self.coord, C.SYNC_EPOCH) > self.sync_epoch)
        self.sync_epoch = self.wins.read(self.coord, C.SYNC_EPOCH)
        return meet(self.shards, reason, self.duties, save)

    # -- what the coordinator publishes ------------------------------------------------
    def step_stats(self, step: int) -> dict:
        """bsp: the weighted mean loss and global norm of ``step``. The coordinator publishes
        them before its version moves, so waiting here costs nothing the next pull would not."""
        block = np.empty(3, dtype=np.int64)

        def published():
            self.wins.read_block(self.coord, C.LAST_LOSS, C.LAST_STEP + 1, out=block)
            return int(block[2]) >= step + 1
        backoff = Backoff()
        backoff.reset(self.stats_waits.expect())
        started = time.monotonic()
        self.wait_until(published, backoff)
        self.stats_waits.add(time.monotonic() - started)
        return {"loss": i2f(block[0]), "grad_norm": i2f(block[1])}

    def split(self) -> list[int]:
        """bsp, ps.balance = speed: each worker's sequences of the step the coordinator
        published last (the step this worker pulled, or after its push the next one)."""
        return self.wins.read_block(self.coord, self.L.split, self.L.split + self.W).tolist()

    def publish_step_time(self, seconds: float) -> None:
        """Local steps in asp: this worker's mean inner step time, for the others' H."""
        self.wins.write(self.coord, self.L.step_time + self.w, max(1, int(seconds * 1e9)))

    def step_times(self) -> np.ndarray:
        """Every worker's published mean step time in seconds (0: none published yet)."""
        block = self.wins.read_block(self.coord, self.L.step_time, self.L.step_time + self.W)
        return block.astype(np.float64) * 1e-9

    def claim(self) -> int:
        """Sample budget: take the next batch number (a raw count; see ``PSSync.claim``)."""
        return self.wins.add(self.coord, C.CLAIMED, 1)

    def applied_totals(self) -> tuple[int, float, float]:
        """asp/ssp: items applied job-wide since the start, and the sums of weight * loss
        and of weight over those pushes (the coordinator's running totals)."""
        block = self.wins.read_block(self.coord, C.APPLIED, C.WEIGHT_SUM + 1)
        return (int(block[0]), i2f(block[C.LOSS_SUM - C.APPLIED]),
                i2f(block[C.WEIGHT_SUM - C.APPLIED]))

    def items_applied(self) -> int:
        """Items (sequences, pairs) of the pushes the servers applied since the last call
        (every push reaches every shard, so the coordinator's count is the job's): the
        lead's measure of global throughput."""
        applied = self.wins.read(self.coord, C.APPLIED)
        delta, self.applied_seen = applied - self.applied_seen, applied
        return delta

    def staleness(self) -> dict:
        """Mean, max and histogram of the staleness of the pushes applied since the last call."""
        hist = self.wins.read_block(self.coord, self.L.hist, self.L.hist + HIST_BINS)
        delta = hist - self.hist_seen
        self.hist_seen = hist
        n = int(delta.sum())
        if n == 0:
            return {}
        last = int(np.nonzero(delta)[0].max())
        values = np.arange(HIST_BINS)
        return {"staleness_mean": float((delta * values).sum() / n), "staleness_max": last,
                "staleness_counts": delta[:last + 1].tolist()}

    def close(self) -> None:
        self.trace.close()
