"""Layout of the int64 control window every server exposes (see docs/protocol.md).

All servers use the same layout; the per-worker coordination words (clocks,
heartbeats, stop proposals, parking) are only used on the *coordinator*, server 0.
Every access to these words is an MPI atomic (``Fetch_and_op``,
``Get_accumulate(NO_OP)``, ``Accumulate(REPLACE/SUM)``), from remote ranks and
from the owning server alike, so no read is torn and no increment is lost.
Each word is written with one operation only (REPLACE or SUM) and read with NO_OP.
"""

from __future__ import annotations

import struct

HIST_BINS = 64  # staleness histogram: bins 0..62 exact, 63 = ">= 63"

# scalar words
VERSION = 0          # updates applied to this shard (bsp: steps completed)
HEARTBEAT = 1        # bumped by the owning server while it runs
STOP_REQUEST = 2     # coordinator: set to 1 by any rank that got SIGUSR1/SIGTERM
SYNC_EPOCH = 3       # coordinator: bumped when every live worker is parked
LAST_LOSS = 4        # float64 bits: bsp weighted mean loss of the last step
LAST_NORM = 5        # float64 bits: bsp global gradient norm of the last step
LAST_STEP = 6        # step that LAST_LOSS / LAST_NORM belong to
APPLIED = 7          # items (sequences, pairs) of the pushes applied (all modes)
PARAMS_GATE = 8      # readers-writer gate of the params window: +1 per reader in flight,
                     # +WRITER while the owner updates (see PSWindows.enter_read)
CLAIMED = 9          # coordinator, sample budget (asp/ssp): batches claimed by workers (SUM)
LOSS_SUM = 10        # coordinator, asp/ssp: float64 bits of sum(weight * loss) of pushes applied
WEIGHT_SUM = 11      # coordinator, asp/ssp: float64 bits of sum(weight) of pushes applied
N_SCALARS = 12

WRITER = 1 << 40     # the owner's share of PARAMS_GATE: far above any reader count


class ControlLayout:
    """Word offsets: scalars, then one word per receive slot, then per-worker coordination
    words (pushers are the workers, or one leader per node with ``ps.hierarchy = node``;
    slots are one per pusher, or fewer in bsp with ``ps.slots``)."""

    def __init__(self, n_workers: int, n_pushers: int | None = None, n_slots: int | None = None):
        w = n_workers
        p = w if n_pushers is None else n_pushers
        k = p if n_slots is None else n_slots
        self.n_workers, self.n_pushers, self.n_slots = w, p, k
        # [k] every server. asp/ssp and bsp with backup workers: slot p is pusher p's,
        # 0 empty / 1 full; bsp: the turn words of hpcps.ps.ring (2n free for push n,
        # 2n + 1 holding it)
        self.slot_state = N_SCALARS
        self.clock = self.slot_state + k         # [w] coordinator: steps pushed by worker
        self.worker_hb = self.clock + w          # [w] coordinator: worker heartbeats
        self.excluded = self.worker_hb + w       # [w] coordinator: 1 while a worker is silent
        self.proposal = self.excluded + w        # [w] coordinator: stop proposal (step + 1)
        self.parked = self.proposal + w          # [w] coordinator: parked at step + 1
        self.hist = self.parked + w              # [HIST_BINS] staleness histogram of this shard
        # [w] coordinator, ps.balance = speed: each worker's sequences of the next bsp step
        self.split = self.hist + HIST_BINS
        # [w] coordinator, local steps in asp: each worker's mean inner step time (ns)
        self.step_time = self.split + w
        self.size = self.step_time + w

    # the block a worker reads once per step from the coordinator
    @property
    def coord_block(self) -> tuple[int, int]:
        return STOP_REQUEST, self.parked + self.n_workers


def f2i(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def i2f(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]
