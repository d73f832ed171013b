"""A server shard: owns params[lo:hi) and its optimizer state, applies pushes.

bsp: waits until all W slots hold step t, averages them weighted by each push's
     weight, clips with the *global* norm (sum of squares added across servers
     with a non-blocking allreduce) and applies one optimizer step.
ssp/asp: applies each slot as it arrives, one optimizer step per push, with the
     clip scale the worker computed from its full gradient.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from hpcps.errors import EXIT_PEER_DEAD
from hpcps.ps import control as C
from hpcps.ps.control import HIST_BINS, f2i, i2f
from hpcps.ps.wait import Backoff, Every, PeerWatch
from hpcps.ps.windows import SLOT_HEADER, Header
from hpcps.runtime.mpi import abort, mpi, say


class Server:
    def __init__(self, *, cfg, roles, wins, codec, optimizer, lr_fn, params_init, version: int = 0):
        self.cfg, self.roles, self.wins = cfg, roles, wins
        self.codec, self.opt, self.lr_fn = codec, optimizer, lr_fn
        self.mode = roles.mode
        self.me = roles.world_rank
        self.index = roles.server_index
        self.coordinator = roles.servers[0]
        self.is_coordinator = self.me == self.coordinator
        self.L = wins.ctl_layout
        self.W = roles.n_workers
        self.params = wins.local_params
        self.wins.params.Lock(self.me, mpi().LOCK_EXCLUSIVE)
        self.params[:] = params_init
        self.wins.params.Unlock(self.me)
        self.version = version
        self.wins.write(self.me, C.VERSION, version)
        self.acc = np.zeros(codec.n, dtype=np.float32)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)
        self.backoff = Backoff()
        self.beat = Every(0.2)
        self.watch_tick = Every(0.25)
        self.epoch_tick = Every(0.002)
        self.sync_epoch = 0
        self.sync_open = False
        self.watch = PeerWatch(range(self.W), cfg.ps.heartbeat_timeout, cfg.ps.dead_timeout)
        self.excluded = np.zeros(self.W, dtype=np.int64)
        self.rr = 0  # round-robin start for async fairness

    # -- duties done in every wait -------------------------------------------------
    def duties(self) -> None:
        now = time.monotonic()
        if self.beat.due(now):
            self.wins.add(self.me, C.HEARTBEAT, 1)
        if self.is_coordinator and self.watch_tick.due(now):
            self._watch_workers(now)

    def _watch_workers(self, now: float) -> None:
        L = self.L
        beats = self.wins.read_block(self.me, L.worker_hb, L.worker_hb + self.W)
        changed = False
        for w in range(self.W):
            state = self.watch.observe(w, int(beats[w]), now)
            rank = self.roles.workers[w]
            if state == "silent":
                say(f"hpcps: warning: worker rank {rank} ({self.roles.hosts[rank]}) silent for "
                    f"{self.watch.silent_for(w, now):.1f} s")
                self.excluded[w] = 1
                changed = True
            elif state == "back":
                say(f"hpcps: worker rank {rank} is back after silence; taking it back")
                self.excluded[w] = 0
                changed = True
            if self.mode == "bsp" and self.watch.is_dead(w, now):
                abort(self.roles.comm, EXIT_PEER_DEAD,
                      f"worker rank {rank} ({self.roles.hosts[rank]}) silent for "
                      f"{self.watch.silent_for(w, now):.0f} s (ps.dead_timeout = "
                      f"{self.cfg.ps.dead_timeout:g}) in bsp; aborting the job")
        if changed:
            self.wins.write_block(self.me, L.excluded, self.excluded)

    def check_parked_workers(self) -> None:
        """Coordinator: when every worker is parked at the same step, open a sync epoch."""
        L = self.L
        parked = self.wins.read_block(self.me, L.parked, L.parked + self.W)
        if np.all(parked > 0):
            if np.any(parked != parked[0]):
                abort(self.roles.comm, 1, f"protocol error: workers parked at different steps "
                      f"{(parked - 1).tolist()}")
            self.wins.add(self.me, C.SYNC_EPOCH, 1)
            self.sync_open = True  # once per parking round: cleared after the collective
            return
        proposals = self.wins.read_block(self.me, L.proposal, L.proposal + self.W)
        if np.any(parked > 0) or np.any(proposals > 0):
            # others wait for these workers at a sync point or a stop: a dead one ends the job
            now = time.monotonic()
            missing = (parked == 0) if np.any(parked > 0) else (proposals == 0)
            for w in np.nonzero(missing)[0]:
                if self.watch.is_dead(int(w), now):
                    rank = self.roles.workers[int(w)]
                    abort(self.roles.comm, EXIT_PEER_DEAD,
                          f"worker rank {rank} ({self.roles.hosts[rank]}) silent for "
                          f"{self.watch.silent_for(int(w), now):.0f} s while the other workers "
                          f"wait for it; aborting the job")

    def sync_requested(self) -> bool:
        if self.is_coordinator:
            if not self.sync_open:
                self.check_parked_workers()
            return self.sync_open
        if not self.epoch_tick.due():
            return False
        epoch = self.wins.read(self.coordinator, C.SYNC_EPOCH)
        return epoch > self.sync_epoch

    # -- main loop -----------------------------------------------------------------
    def serve_until_sync(self) -> int:
        """Apply pushes until a sync epoch opens; drain what is pending; return the epoch."""
        while True:
            self.duties()
            progressed = self.apply_pending()
            if not progressed and self.sync_requested():
                while self.apply_pending():
                    pass
                self.sync_epoch = self.wins.read(self.coordinator, C.SYNC_EPOCH)
                return self.sync_epoch
            if progressed:
                self.backoff.reset()
            else:
                self.backoff.pause()

    def slot_states(self) -> np.ndarray:
        L = self.L
        return self.wins.read_block(self.me, L.slot_state, L.slot_state + self.W)

    def apply_pending(self) -> bool:
        states = self.slot_states()
        if self.mode == "bsp":
            if not np.all(states == 1):
                return False
            self._apply_bsp()
            return True
        full = np.nonzero(states == 1)[0]
        if len(full) == 0:
            return False
        order = sorted(int(w) for w in full)
        order = [w for w in order if w >= self.rr] + [w for w in order if w < self.rr]
        for w in order:
            self._apply_async(w)
        self.rr = (order[-1] + 1) % self.W
        return True

    def _headers(self, workers) -> list[np.ndarray]:
        self.wins.slots.Sync()  # make the workers' completed Puts visible to local loads
        return [self.wins.local_slot(w)[:SLOT_HEADER].view(np.int64).copy() for w in workers]

    def _payload(self, w: int, nbytes: int) -> np.ndarray:
        return self.wins.local_slot(w)[SLOT_HEADER:SLOT_HEADER + nbytes]

    def _apply_bsp(self) -> None:
        W = self.W
        heads = self._headers(range(W))
        steps = {int(h[Header.STEP]) for h in heads}
        if steps != {self.version}:
            abort(self.roles.comm, 1, f"protocol error: server {self.index} at step {self.version} "
                  f"got pushes for steps {sorted(steps)}")
        weights = np.array([i2f(h[Header.WEIGHT]) for h in heads])
        total = float(weights.sum())
        self.acc.fill(0.0)
        for w in range(W):
            self.codec.decode_add(self._payload(w, int(heads[w][Header.NBYTES])), self.acc,
                                  weights[w] / total)
        loss = float(sum(weights[w] * i2f(heads[w][Header.LOSS]) for w in range(W)) / total)
        sumsq = float(self.acc @ self.acc)
        total_sumsq = self._allreduce_servers(sumsq)
        from hpcps.optim.clip import clip_coefficient
        norm, scale = clip_coefficient(total_sumsq, self.cfg.train.grad_clip)
        for h in heads:
            self.hist[min(max(0, self.version - int(h[Header.PULLED_VERSION])), HIST_BINS - 1)] += 1
        # slots are released and the step's stats published before the version moves:
        # a worker that sees version t+1 finds its slot free
        self.wins.write_block(self.me, self.L.slot_state, np.zeros(W, dtype=np.int64))
        if self.is_coordinator:
            self.wins.write_block(self.me, C.LAST_LOSS,
                                  np.array([f2i(loss), f2i(norm), self.version + 1], dtype=np.int64))
        self.wins.add(self.me, C.APPLIED, W)
        self._update(self.acc, self.lr_fn(self.version), scale)

    def _apply_async(self, w: int) -> None:
        head = self._headers([w])[0]
        self.acc.fill(0.0)
        self.codec.decode_add(self._payload(w, int(head[Header.NBYTES])), self.acc, 1.0)
        stale = max(0, self.version - int(head[Header.PULLED_VERSION]))
        self.hist[min(stale, HIST_BINS - 1)] += 1
        self._update(self.acc, self.lr_fn(int(head[Header.STEP])), i2f(head[Header.SCALE]))
        self.wins.write(self.me, self.L.slot_state + w, 0)
        self.wins.add_block(self.me, self.L.hist, self.hist)
        self.hist[:] = 0
        self.wins.add(self.me, C.APPLIED, 1)

    def _update(self, grad, lr: float, scale: float) -> None:
        """One optimizer step under the exclusive lock; the version moves inside it, so a
        pull that reads VERSION under its shared lock gets exactly that version's params."""
        MPI = mpi()
        self.wins.params.Lock(self.me, MPI.LOCK_EXCLUSIVE)
        self.opt.step(self.params, grad, lr, scale)
        self.version += 1
        self.wins.write(self.me, C.VERSION, self.version)
        self.wins.params.Unlock(self.me)
        if self.mode == "bsp" and self.hist.any():
            self.wins.add_block(self.me, self.L.hist, self.hist)
            self.hist[:] = 0

    def _allreduce_servers(self, value: float) -> float:
        comm = self.roles.server_comm
        if comm.Get_size() == 1:
            return value
        MPI = mpi()
        send = np.array([value], dtype=np.float64)
        recv = np.empty(1, dtype=np.float64)
        req = comm.Iallreduce(send, recv, op=MPI.SUM)
        backoff = Backoff()
        while not req.Test():
            self.duties()  # keep heartbeating and watching while other shards catch up
            backoff.pause()
        return float(recv[0])

    # -- state for checkpoints -----------------------------------------------------
    def snapshot(self) -> dict:
        state = {k: (np.array(v, copy=True) if hasattr(v, "shape") else v)
                 for k, v in self.opt.state().items()}
        state["params"] = np.array(self.params, copy=True)
        state["version"] = self.version
        return state


def server_memory_bytes(n: int, n_workers: int, stride: int, optimizer: str) -> int:
    """Bytes a shard of n elements needs: params + optimizer state + scratch + slots + acc."""
    state = 2 if optimizer == "adamw" else 1
    return n * 4 * (1 + state + 1 + 1) + n_workers * stride


def report_memory(roles, n: int, stride: int, optimizer: str) -> None:
    total = server_memory_bytes(n, roles.n_workers, stride, optimizer)
    say(f"hpcps: server {roles.server_index} (rank {roles.world_rank}) holds {n} params: "
        f"{total / 2**20:.1f} MiB (params+state+scratch+acc {n * 4 * (4 if optimizer == 'adamw' else 3) / 2**20:.1f} "
        f"MiB, {roles.n_workers} push slots {roles.n_workers * stride / 2**20:.1f} MiB)", stream=sys.stdout)
