"""The three MPI windows of the parameter server and the atomic helpers on them.

Every window comes from ``MPI.Win.Allocate`` (collective over the world; only
servers give it memory). With Open MPI a ``Win.Create`` window stalls remote
accumulates while the target computes; allocated windows do not.

- ``params``  fp32 [shard]: workers ``Get`` it after entering the shard's
  readers-writer gate (``enter_read``); the owner updates it only after closing
  the gate and seeing every reader leave (``begin_write``), so a pull never sees
  half an update.
- ``slots``   bytes [k x slot]: receive slots; pusher p ``Put``s its encoded push into slot p
  (one slot per pusher), or into the slot its turn gives it (bsp, ``hpcps.ps.ring``).
- ``ctl``     int64 [ControlLayout.size]: versions, flags, clocks, heartbeats.

All three windows stay in one ``Lock_all`` passive epoch for the whole run;
every operation completes at the target before the next one is issued (``Flush``,
or a request-based atomic whose result has arrived).
The gate is a control word changed with atomic adds instead of ``MPI_Win_lock``:
with MPICH a lock request on a remote rank is granted only when that rank enters
the MPI progress engine, so a pull stalled for as long as its server computed or
slept (tens of ms per step when ranks share cores). Atomics and Gets on an
allocated shared-memory window complete without the target's help.
"""

from __future__ import annotations

import os
import time

import numpy as np

from hpcps.ps import control as C
from hpcps.ps.control import ControlLayout
from hpcps.runtime.mpi import mpi

LATENCY_ENV = "HPCPS_ATOMIC_LATENCY"  # benchmarks: a folder for each rank's atomic latencies
SLOT_HEADER = 64           # bytes: 8 x int64 (see Header)
ALIGN = 64
GUARD_BYTES = 64           # sentinel bytes before and after every window buffer
GUARD_BYTE = 0xA5
G_PARAMS = GUARD_BYTES // 4  # guard size in each window's displacement unit
G_SLOTS = GUARD_BYTES
G_CTL = GUARD_BYTES // 8


class Header:
    """int64 words at the start of a slot. WEIGHT, LOSS, SCALE and COMPUTE_S hold float64
    bits; COMPUTE_S is the pusher's compute seconds for this push (speed balance)."""
    STEP, PULLED_VERSION, NBYTES, WEIGHT, LOSS, COMPUTE_S, SCALE, ITEMS = range(8)


def slot_stride(max_payload: int) -> int:
    size = SLOT_HEADER + max_payload
    return (size + ALIGN - 1) // ALIGN * ALIGN


class PSWindows:
    """The three windows of a PS job (collective to create and free) and the atomic
    accessors every rank uses on them: control-word reads, writes and adds, the params
    gate, and slot addressing. Servers hold the memory; workers hold none."""

    def __init__(self, comm, roles, ranges, max_payloads, n_slots: int | None = None):
        MPI = mpi()
        self.MPI = MPI
        self.comm = comm
        self.roles = roles
        self.ranges = ranges
        self.n_slots = roles.n_pushers if n_slots is None else n_slots
        self.ctl_layout = ControlLayout(roles.n_workers, roles.n_pushers, self.n_slots)
        self.strides = [slot_stride(p) for p in max_payloads]
        s = roles.server_index if roles.is_server else -1
        n = ranges[s][1] - ranges[s][0] if s >= 0 else 0
        slots = self.n_slots
        # each buffer sits between two guard regions filled with a sentinel: a remote write
        # that overruns its target range is caught by check_guards() (RMA displacements
        # are shifted by the guard so callers never see it)
        g = GUARD_BYTES
        self.params = MPI.Win.Allocate(n * 4 + 2 * g if s >= 0 else 0, 4, comm=comm)
        self.slots = MPI.Win.Allocate(slots * self.strides[s] + 2 * g if s >= 0 else 0, 1,
                                      comm=comm)
        # MPI's default accumulate_ops=same_op_no_op holds: every control word is written
        # with one op only (REPLACE or SUM) and read with NO_OP (docs/protocol.md)
        self.ctl = MPI.Win.Allocate(self.ctl_layout.size * 8 + 2 * g if s >= 0 else 0, 8, comm=comm)
        self._raw = []
        if s >= 0:
            for win in (self.params, self.slots, self.ctl):
                raw = np.frombuffer(win.tomemory(), dtype=np.uint8)
                raw[:g] = GUARD_BYTE
                raw[len(raw) - g:] = GUARD_BYTE
                self._raw.append(raw)
            self.local_params = self._raw[0][g:len(self._raw[0]) - g].view(np.float32)
            self.local_slots = self._raw[1][g:len(self._raw[1]) - g]
            self._raw[2][g:len(self._raw[2]) - g].view(np.int64)[:] = 0
        else:
            self.local_params = self.local_slots = None
        comm.Barrier()  # guards set and control words zeroed before anyone touches them
        self.params.Lock_all()
        self.slots.Lock_all()
        self.ctl.Lock_all()
        self._word = np.zeros(1, dtype=np.int64)
        self._result = np.zeros(1, dtype=np.int64)
        # benchmarks: the latency of every control-word atomic to another rank (seconds),
        # written to LATENCY_ENV's folder when the windows are freed
        self.latency_dir = os.environ.get(LATENCY_ENV, "")
        self.latencies: list | None = [] if self.latency_dir else None
        # request-based atomics to other ranks (see _atomic); Open MPI over TCP at times
        # never completes such a request, so it keeps the blocking Flush
        self.yielding_atomics = "MPICH" in self.MPI.Get_library_version()

    def _atomic(self, rank: int, origin: np.ndarray, result: np.ndarray | None, index: int,
                op) -> None:
        """A control-word atomic on ``len(origin)`` words from ``index``, completed at the
        target; ``result`` (if given) receives the words before it.

        To another rank under MPICH: request-based, and between tests this rank yields its
        core. Over a network module the atomic waits until the target enters MPI; a
        blocking ``Flush`` would spin meanwhile and, where ranks share cores, take the
        very core the target needs to get there (measured: p99 latency 5.5 -> 3.3 ms, 3
        ranks on 2 cores). To itself, and under Open MPI (whose TCP path at times never
        completes such a request): the blocking calls and ``Flush``."""
        MPI, n = self.MPI, len(origin)
        started = time.perf_counter()
        target = (G_CTL + index, n, MPI.INT64_T)
        if rank != self.roles.world_rank and self.yielding_atomics:
            result = np.empty_like(origin) if result is None else result
            request = self.ctl.Rget_accumulate([origin, MPI.INT64_T], [result, MPI.INT64_T],
                                               rank, target, op=op)
            while not request.Test():
                os.sched_yield()
        else:
            if result is None:
                self.ctl.Accumulate([origin, MPI.INT64_T], rank, target, op=op)
            elif origin is self._word:   # the one-word helpers
                self.ctl.Fetch_and_op([origin, MPI.INT64_T], [result, MPI.INT64_T], rank,
                                      G_CTL + index, op)
            else:
                self.ctl.Get_accumulate([origin, MPI.INT64_T], [result, MPI.INT64_T], rank,
                                        target, op=op)
            self.ctl.Flush(rank)
        if self.latencies is not None and rank != self.roles.world_rank:
            self.latencies.append(time.perf_counter() - started)

    def progress(self) -> None:
        """Enter MPI's progress engine. Over a network module, other ranks' atomics (and with
        some MPIs their gets) on our windows complete only while we are inside MPI; a rank
        that owns window memory calls this between short naps and chunks of local work."""
        self.comm.Iprobe(self.MPI.ANY_SOURCE, self.MPI.ANY_TAG)

    # -- atomics on ctl ------------------------------------------------------------
    def read(self, rank: int, index: int) -> int:
        self._atomic(rank, self._word, self._result, index, self.MPI.NO_OP)
        return int(self._result[0])

    def read_block(self, rank: int, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(hi - lo, dtype=np.int64) if out is None else out
        self._atomic(rank, out, out, lo, self.MPI.NO_OP)
        return out

    def write(self, rank: int, index: int, value: int) -> None:
        self._word[0] = value
        self._atomic(rank, self._word, None, index, self.MPI.REPLACE)

    def write_block(self, rank: int, lo: int, values: np.ndarray) -> None:
        self._atomic(rank, np.ascontiguousarray(values, dtype=np.int64), None, lo,
                     self.MPI.REPLACE)

    def add(self, rank: int, index: int, delta: int = 1) -> int:
        """Atomic fetch-and-add; returns the old value."""
        self._word[0] = delta
        self._atomic(rank, self._word, self._result, index, self.MPI.SUM)
        return int(self._result[0])

    def add_block(self, rank: int, lo: int, deltas: np.ndarray) -> None:
        self._atomic(rank, np.ascontiguousarray(deltas, dtype=np.int64), None, lo,
                     self.MPI.SUM)

    # -- the params gate -----------------------------------------------------------
    def enter_read(self, rank: int) -> bool:
        """Try to become a reader of ``rank``'s params; False while its owner updates them
        (the caller retries later). A True must be paired with ``leave_read``."""
        if self.add(rank, C.PARAMS_GATE, 1) < C.WRITER:
            return True
        self.add_block(rank, C.PARAMS_GATE, np.array([-1], dtype=np.int64))
        return False

    def leave_read(self, rank: int) -> None:
        self.add_block(rank, C.PARAMS_GATE, np.array([-1], dtype=np.int64))

    def begin_write(self, duties=None) -> None:
        """Owner: close the gate to new readers and wait for the ones in flight (a short
        wait; their leave_read atomics need our progress over a network module)."""
        me = self.roles.world_rank
        self.add(me, C.PARAMS_GATE, C.WRITER)
        pauses = 0
        while self.read(me, C.PARAMS_GATE) != C.WRITER:
            pauses += 1
            self.progress()
            if duties is not None and pauses % 64 == 0:
                duties()
            time.sleep(0 if pauses < 8 else 2e-5)

    def end_write(self) -> None:
        self.params.Sync()  # our stores to the shard are visible before readers come back
        self.add_block(self.roles.world_rank, C.PARAMS_GATE,
                       np.array([-C.WRITER], dtype=np.int64))

    # -- slots ---------------------------------------------------------------------
    def slot_offset(self, server_index: int, slot: int) -> int:
        """Displacement of a receive slot in the slots window (guard included)."""
        return G_SLOTS + slot * self.strides[server_index]

    def local_slot(self, slot: int) -> np.ndarray:
        s = self.roles.server_index
        off = slot * self.strides[s]
        return self.local_slots[off:off + self.strides[s]]

    def check_guards(self) -> list[str]:
        """Names of the window guards that were overwritten (empty when all are intact)."""
        bad = []
        for name, raw in zip(("params", "slots", "ctl"), self._raw):
            g = GUARD_BYTES
            if np.any(raw[:g] != GUARD_BYTE):
                bad.append(f"{name}[before]")
            if np.any(raw[len(raw) - g:] != GUARD_BYTE):
                bad.append(f"{name}[after]")
        return bad

    def free(self) -> None:
        if self.latencies is not None:
            os.makedirs(self.latency_dir, exist_ok=True)
            np.save(os.path.join(self.latency_dir, f"rank{self.roles.world_rank}.npy"),
                    np.asarray(self.latencies, dtype=np.float64))
        self.params.Unlock_all()
        self.slots.Unlock_all()
        self.ctl.Unlock_all()
        for win in (self.params, self.slots, self.ctl):
            win.Free()
