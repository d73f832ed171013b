"""The worker's strategy in the parameter-server modes (bsp, ssp, asp).

Besides pull and push it runs the worker half of the coordination protocol on
the coordinator (server 0), see docs/protocol.md:

- stop agreement: a rank that got SIGUSR1/SIGTERM sets STOP_REQUEST; every
  worker then proposes the step it is at and waits there until all workers have
  proposed; all stop at the largest proposal, so no worker is ever past it.
- ssp: before step c, wait until every non-excluded worker's clock >= c - s.
- sync points (checkpoint, stop, end): park at the step, wait for the
  coordinator to open a sync epoch (all workers parked, servers drained), then
  meet every rank in one collective.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from hpcps.optim.clip import clip_coefficient
from hpcps.ps import control as C
from hpcps.ps.client import PSClient
from hpcps.ps.control import HIST_BINS, i2f
from hpcps.ps.wait import Backoff, WaitHistory
from hpcps.runtime import signals
from hpcps.runtime.polled import PolledComm


def sync_collective(roles, wins, reason, checkpointer, *, shard=None, worker=None,
                    duties=None) -> dict:
    """Every rank meets here once all workers are parked and the servers drained.
    ``shard`` is a callable returning (lo, hi, state) on servers. Every collective in
    here (the checkpoint's included) polls and runs ``duties`` (heartbeats, watches)
    while it waits: a rank stopped after parking would otherwise hang all the others."""
    comm = PolledComm(roles.comm, duties)
    comm.Barrier()
    reason = comm.bcast(reason, root=roles.lead_worker)
    if reason.get("checkpoint") and checkpointer is not None:
        with checkpointer.communicating_through(comm):
            checkpointer.save(reason["step"], shard=shard() if shard else None, worker=worker,
                              reason=reason)
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
            # line-buffered: nothing calls close() on the way out of a run
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


class PSSync:
    stats_every_step = True

    def __init__(self, *, cfg, roles, wins, ranges, codecs, layout, params, checkpointer=None):
        self.cfg, self.roles, self.wins, self.layout = cfg, roles, wins, layout
        self.params = params
        self.client = PSClient(cfg=cfg, roles=roles, wins=wins, ranges=ranges, codecs=codecs,
                               params=params)
        self.checkpointer = checkpointer
        self.mode = roles.mode
        self.w = roles.worker_index
        self.W = roles.n_workers
        self.coord = roles.servers[0]
        self.L = wins.ctl_layout
        self.is_lead = roles.world_rank == roles.lead_worker
        self.proposal = 0           # step + 1 once proposed
        self.stop_at = None
        self.stop_sent = False
        self.sync_epoch = 0
        self.hist_seen = np.zeros(HIST_BINS, dtype=np.int64)
        self.ssp_waits = 0          # steps that had to wait for the bound (instrumentation)
        self.max_lead = 0           # largest (own clock - min live clock) seen when starting a step
        self.trace = EventTrace(self.w)
        self.stats_waits = WaitHistory()  # bsp lead: push -> the step's published stats

    # -- coordination ------------------------------------------------------------------
    def _read_coord(self) -> dict:
        lo, hi = self.L.coord_block
        block = self.wins.read_block(self.coord, lo, hi)
        W, base = self.W, lo

        def part(start):
            return block[start - base:start - base + W]
        return {"stop": int(block[C.STOP_REQUEST - base]), "clock": part(self.L.clock),
                "excluded": part(self.L.excluded), "proposal": part(self.L.proposal)}

    def decide(self, step: int) -> bool:
        """Wait as the protocol says; True when every worker stops at this step."""
        backoff = Backoff()
        while True:
            if signals.stop_requested() and not self.stop_sent:
                self.wins.write(self.coord, C.STOP_REQUEST, 1)
                self.stop_sent = True
            state = self._read_coord()
            if state["stop"] and not self.proposal:
                self.proposal = step + 1
                self.wins.write(self.coord, self.L.proposal + self.w, self.proposal)
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
                clocks[self.w] = step
                live = (state["excluded"] == 0)
                live[self.w] = True
                lead = step - int(clocks[live].min())
                if lead > self.cfg.ps.staleness:
                    waiting = True
                    self.ssp_waits += 1
                else:
                    self.max_lead = max(self.max_lead, lead)
            if not waiting:
                self.trace.event("start", step, lead=lead)
                return False
            self.client.duties()
            backoff.pause()

    def sync_point(self, step: int, reason: dict, worker_state: dict) -> None:
        self.wins.write(self.coord, self.L.parked + self.w, step + 1)
        self.client.wait_until(lambda: self.wins.read(self.coord, C.SYNC_EPOCH) > self.sync_epoch)
        self.sync_epoch = self.wins.read(self.coord, C.SYNC_EPOCH)
        sync_collective(self.roles, self.wins, reason, self.checkpointer, worker=worker_state,
                        duties=self.client.duties)

    # -- data path ---------------------------------------------------------------------
    def pull(self, step: int) -> None:
        self.client.wait(self.client.pull(step))

    def begin_backward(self, grads, touched) -> None:
        self.client.begin_step(grads, touched)

    def grad_ready(self, lo: int, hi: int) -> None:
        self.client.grad_ready(lo, hi)

    def push(self, step: int, grads, weight: float, loss: float) -> dict:
        norm = None
        scale = 1.0
        if self.mode != "bsp":  # no global aggregate to clip: clip this worker's gradient
            norm, scale = clip_coefficient(float(grads @ grads), self.cfg.train.grad_clip)
        self.trace.event("push", step)
        self.client.push(step, weight=weight, loss=loss, scale=scale)
        stats = {"loss": loss, "grad_norm": norm}
        if self.mode == "ssp":  # the largest lead over the slowest live worker so far
            stats["ssp_max_lead"] = self.max_lead
        if self.is_lead:
            if self.mode == "bsp":
                stats.update(self._bsp_stats(step))
            stats.update(self._staleness())
        return stats

    def _bsp_stats(self, step: int) -> dict:
        """The coordinator publishes the weighted mean loss and global norm of each step
        before its version moves, so waiting here costs nothing the next pull would not."""
        block = np.empty(3, dtype=np.int64)

        def published():
            self.wins.read_block(self.coord, C.LAST_LOSS, C.LAST_STEP + 1, out=block)
            return int(block[2]) >= step + 1
        backoff = Backoff()
        backoff.reset(self.stats_waits.expect())
        started = time.monotonic()
        self.client.wait_until(published, backoff)
        self.stats_waits.add(time.monotonic() - started)
        return {"loss": i2f(block[0]), "grad_norm": i2f(block[1])}

    def _staleness(self) -> dict:
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

    def traffic(self) -> dict:
        c = self.client
        out = {"push_mb": c.bytes_pushed / 1e6, "pull_mb": c.bytes_pulled / 1e6}
        c.bytes_pushed = c.bytes_pulled = 0
        return out

    def close(self) -> None:
        self.trace.close()
