"""Worker side of the data path: ``pull`` and ``push`` return handles,
``wait(handle)`` completes them (ps-lite style).

push: for every server, wait until this push's slot there is free (our own slot;
in bsp the slot and turn of the push's ticket, ``hpcps.ps.ring``), ``Put`` the
encoded payload and its header (``push``), then ``Flush`` (remote completion)
and set the slot's word with an atomic REPLACE (``wait``). The word is written
only after the data is complete at the target, so a server that sees it sees the
whole push.

Overlap: ``start_push`` returns the callback that backward calls as gradient
ranges become final (last layers first). A plain fp32 shard gets its bytes
``Put`` right away, bucket by bucket; an encoded shard is encoded and sent as
soon as its whole range is final. Only the header, the flush and the flag wait
for backward's end.

``ps.link_gbps`` (experiments) makes each worker's link slow: see ``EmulatedLink``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from hpcps.ps import control as C
from hpcps.ps.codec import ErrorFeedback
from hpcps.ps.control import f2i
from hpcps.ps.ring import SlotRing
from hpcps.ps.shards import ShardSet
from hpcps.ps.windows import G_PARAMS, SLOT_HEADER, Header
from hpcps.runtime.mpi import mpi
from hpcps.runtime.wait import Backoff, WaitHistory, wait_until


class EmulatedLink:
    """One direction of a worker's link to the servers, slowed to ``ps.link_gbps`` so that
    time to finish over slow links can be measured on one machine.

    Transfers queue on the link one after another: one of b bytes started at time t is
    delivered at max(t, the previous delivery) + 8 b / (link_gbps x 1e9). The real
    transfer (shared memory, a fast network) completes first; ``wait_delivered`` then
    waits out the rest. A pull or push therefore takes at least its bytes' link time from
    its first byte, and transfers that overlap compute (pushes during backward) overlap
    it here too. The wait runs the duties (heartbeats, stop answers): a 124M model's pull
    at 0.1 Gb/s takes 40 s, far longer than peers may go without hearing from us."""

    def __init__(self, gbps: float):
        self.seconds_per_byte = 8.0 / (gbps * 1e9) if gbps > 0 else 0.0
        self.delivered_at = 0.0    # time.monotonic() when all bytes sent so far arrived

    def send(self, nbytes: int) -> None:
        if self.seconds_per_byte:
            start = max(time.monotonic(), self.delivered_at)
            self.delivered_at = start + nbytes * self.seconds_per_byte

    def wait_delivered(self, duties: Callable[[], None]) -> None:
        left = self.delivered_at - time.monotonic()
        if left <= 0:
            return
        backoff = Backoff()
        backoff.reset(left)    # naps of at most NAP_SLICE with the duties between them
        wait_until(lambda: time.monotonic() >= self.delivered_at, duties, backoff)


@dataclass
class PullHandle:
    step: int
    locked: list = field(default_factory=list)     # ranks whose gate we hold
    requests: list = field(default_factory=list)   # their Rget requests
    done: bool = False
    fragment: Optional[int] = None                 # streaming: only this fragment's ranges


@dataclass
class PushHandle:
    step: int
    done: bool = False    # False until the flags are set (``wait``)


class PSClient:
    """One worker's pulls and pushes. ``duties`` (heartbeats, watches, stop answers) runs
    in every wait; ``params`` is the host fp32 buffer [P] pulls land in."""

    def __init__(self, *, cfg, shards: ShardSet, params: np.ndarray,
                 duties: Callable[[], None]):
        roles = shards.roles
        self.cfg, self.roles, self.wins = cfg, roles, shards.wins
        self.ranges, self.codecs = shards.ranges, shards.codecs
        # streaming local steps: a push or pull of one fragment (None: whole shards)
        self.fragments, self.fragment_codecs = shards.fragments, shards.fragment_codecs
        self._push_codecs = self.codecs   # the encodings of the push being sent
        self.params = params
        self.duties = duties
        self.mode = roles.mode
        self.slot = roles.pusher_index   # our pusher index (and our own slot, without turns)
        # bsp: the pushes of a step take turns in the servers' slots (None: our own slot)
        self.ring: Optional[SlotRing] = shards.ring
        self.servers = roles.servers
        self.S = len(self.servers)
        self.L = self.wins.ctl_layout
        self.send = [np.zeros(SLOT_HEADER + c.max_payload_bytes, dtype=np.uint8)
                     for c in self.codecs]
        # one header per server, alive until the push's Flush: Put may read it that late
        self.headers = np.zeros((self.S, SLOT_HEADER // 8), dtype=np.int64)
        self.feedback = ([ErrorFeedback(c) for c in self.codecs]
                         if cfg.ps.error_feedback and cfg.ps.compression != "none" else None)
        self.pulled_version = [0] * self.S
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.uplink = EmulatedLink(cfg.ps.link_gbps)     # pushes
        self.downlink = EmulatedLink(cfg.ps.link_gbps)   # pulls
        self._ready = [0] * self.S
        self._sent = [False] * self.S
        self._nbytes = [0] * self.S
        # our slot on shard s: known free (only we fill it, so a free slot stays free until
        # our next push), and whether this push already asked (one remote read per push)
        self._slot_known_free = [True] * self.S
        self._slot_asked = [False] * self.S
        # this push's ticket and slot on each shard (without turns: our own slot)
        self._ticket = [0] * self.S
        self._push_slot = [self.slot] * self.S
        self._grads = None
        self._touched = None
        self.overlap = cfg.ps.overlap
        # bsp with one slot per pusher: the server frees our slot of step t before it moves
        # VERSION to t+1, and we push step t+1 only after pulling version t+1, so the slot is
        # free without asking (not with fewer slots, whose turns pass between pushers, nor
        # with backup workers: a late push of step t may still wait in it for update t+1)
        self.slot_always_free = self.ring is not None and self.ring.always_free
        # asp/ssp, ps.read_your_writes: a shard is pulled only once it applied our last push
        # (the server frees our slot after that update), so the gradient we compute next sees
        # our own last update; otherwise every push would also be stale by itself
        self.pull_after_own_push = self.mode != "bsp" and cfg.ps.read_your_writes
        self.apply_waits = WaitHistory()    # asp/ssp: pull -> our last push applied
        self.version_waits = WaitHistory()  # bsp: push -> next version, mostly the server's update

    def wait_until(self, condition: Callable[[], bool], backoff: Optional[Backoff] = None) -> None:
        wait_until(condition, self.duties, backoff)

    def take_traffic(self) -> dict:
        """MB pushed and pulled since the last call."""
        out = {"push_mb": self.bytes_pushed / 1e6, "pull_mb": self.bytes_pulled / 1e6}
        self.bytes_pushed = self.bytes_pulled = 0
        return out

    def residual(self) -> Optional[np.ndarray]:
        """Error feedback's residual over the whole buffer (None without feedback)."""
        if self.feedback is None:
            return None
        return np.concatenate([fb.residual for fb in self.feedback])

    def load_residual(self, residual) -> None:
        if self.feedback is not None and residual is not None and len(residual) == self.ranges[-1][1]:
            for fb, (lo, hi) in zip(self.feedback, self.ranges):
                fb.residual[:] = residual[lo:hi]

    # -- pull ------------------------------------------------------------------------
    def pull(self, step: int, fragment: Optional[int] = None) -> PullHandle:
        """Start fetching every shard (or only fragment ``fragment`` of each, streaming
        local steps); in bsp a shard is fetched once it holds step ``step``."""
        handle = PullHandle(step, fragment=fragment)
        pending = list(range(self.S))
        backoff = Backoff()
        bsp = self.mode == "bsp"
        # read your writes: nap through most of the expected wait for our own push instead of
        # polling its slot (every poll is an atomic on the server's window)
        own = self.pull_after_own_push and not all(self._slot_known_free)
        if bsp:
            backoff.reset(self.version_waits.expect())
        elif own:
            backoff.reset(self.apply_waits.expect())
        started = time.monotonic()
        while pending:
            still = []
            for s in pending:
                if self.mode == "bsp" and self.wins.read(self.servers[s], C.VERSION) < step:
                    still.append(s)
                    continue
                if self.pull_after_own_push and not self._own_push_applied(s):
                    still.append(s)
                    continue
                if not self._start_get(s, handle):
                    still.append(s)  # the owner is updating this shard right now
            pending = still
            if pending:
                # never hold one shard's gate while waiting for another: two workers holding
                # one gate each while both owners wait to write would deadlock
                self._finish_gets(handle)
                self.duties()
                backoff.pause()
        if bsp:
            self.version_waits.add(time.monotonic() - started)
        elif own:
            self.apply_waits.add(time.monotonic() - started)
        return handle

    def _own_push_applied(self, s: int) -> bool:
        """Shard ``s`` applied our last push (asp/ssp with ps.read_your_writes: our slot is
        freed after the update). Asks the server only while the slot is not known free."""
        if not self._slot_known_free[s]:
            self._slot_known_free[s] = self._read_slot_free(s)
        return self._slot_known_free[s]

    def _read_slot_free(self, s: int) -> bool:
        """Shard ``s``'s slot for this push is free (for its ticket, with turns)."""
        word = self.wins.read(self.servers[s], self.L.slot_state + self._push_slot[s])
        if self.ring is None:
            return word == 0
        return word == self.ring.free_word(self._ticket[s])

    def _start_get(self, s: int, handle: PullHandle) -> bool:
        MPI = mpi()
        rank = self.servers[s]
        lo, hi = self.ranges[s]
        if not self.wins.enter_read(rank):
            return False
        # the server moves VERSION only while the gate is closed: this read matches the data
        self.pulled_version[s] = self.wins.read(rank, C.VERSION)
        parts = ([(0, hi - lo)] if handle.fragment is None
                 else self.fragment_codecs[s][handle.fragment].ranges)
        for a, b in parts:   # shard-relative ranges
            handle.requests.append(self.wins.params.Rget(
                [self.params[lo + a:lo + b], MPI.FLOAT], rank, (G_PARAMS + a, b - a, MPI.FLOAT)))
            self.bytes_pulled += (b - a) * 4
            self.downlink.send((b - a) * 4)
        handle.locked.append(rank)
        return True

    def _finish_gets(self, handle: PullHandle) -> None:
        mpi().Request.Waitall(handle.requests)  # the data is here: leave the gates
        for rank in handle.locked:
            self.wins.leave_read(rank)
        handle.requests.clear()
        handle.locked.clear()

    def wait(self, handle) -> None:
        """Complete a pull (the data is in ``params``) or a push (the server may apply it)."""
        if handle.done:
            return
        if isinstance(handle, PullHandle):
            self._finish_gets(handle)
            # the gates are left: waiting out the emulated link while holding one would keep
            # its server from updating (and, in bsp, every other worker waiting on it)
            self.downlink.wait_delivered(self.duties)
        else:
            # the emulated link delivers the payload no sooner than its bytes allow: the
            # flags below, which let the server apply it, must not be raised earlier
            self.uplink.wait_delivered(self.duties)
            for s, rank in enumerate(self.servers):
                self.wins.slots.Flush(rank)  # payload complete at the target ...
                full = 1 if self.ring is None else self.ring.full_word(self._ticket[s])
                # ... before the slot's word says so
                self.wins.write(rank, self.L.slot_state + self._push_slot[s], full)
                self._slot_known_free[s] = False
        handle.done = True

    # -- push ------------------------------------------------------------------------
    def start_push(self, grads: np.ndarray, touched: Optional[dict],
                   fragment: Optional[int] = None) -> Callable[[int, int], None]:
        """Before backward: where gradients will appear and which rows the batch touched.
        Returns the callback for backward to report finished gradient ranges.
        ``fragment``: the push carries only that fragment of each shard (streaming local
        steps; ``grads`` is zero outside it)."""
        self._grads, self._touched = grads, touched
        self._push_codecs = (self.codecs if fragment is None
                             else [codecs[fragment] for codecs in self.fragment_codecs])
        self._ready = [0] * self.S
        self._sent = [False] * self.S
        self._slot_asked = [False] * self.S
        if self.ring is not None:
            # bsp pushes the step it pulled (every push follows that step's pull); a new
            # ticket's turn is unknown until asked
            for s in range(self.S):
                self._ticket[s] = self.ring.ticket(self.pulled_version[s], self.slot)
                self._push_slot[s] = self.ring.slot(self._ticket[s])
                self._slot_known_free[s] = self.ring.always_free
        return self._grad_ready

    def _grad_ready(self, lo: int, hi: int) -> None:
        """Backward finished gradient range [lo, hi): send what can already be sent."""
        if not self.overlap or self._grads is None:
            return
        for s, (a, b) in enumerate(self.ranges):
            x, y = max(a, lo), min(b, hi)
            if x >= y or self._sent[s]:
                continue
            if not self._slot_is_free(s):
                continue
            plain = self._push_codecs[s].is_plain_dense and self.feedback is None
            if plain:  # the payload is the gradient itself: put this bucket now
                self._put_bytes(s, SLOT_HEADER + (x - a) * 4, self._grads[x:y])
            self._ready[s] += y - x
            if self._ready[s] == b - a:
                if plain:
                    self._nbytes[s] = (b - a) * 4
                else:
                    self._encode_and_put(s)
                self._sent[s] = True

    def _slot_is_free(self, s: int) -> bool:
        if self.slot_always_free:
            return True
        if not self._slot_known_free[s] and not self._slot_asked[s]:
            self._slot_asked[s] = True
            self._slot_known_free[s] = self._read_slot_free(s)
        return self._slot_known_free[s]

    def _put_bytes(self, s: int, offset: int, values: np.ndarray) -> None:
        rank = self.servers[s]
        target = self.wins.slot_offset(s, self._push_slot[s]) + offset
        self.wins.slots.Put([values, mpi().BYTE], rank, (target, values.nbytes, mpi().BYTE))
        self.uplink.send(values.nbytes)

    def _encode_and_put(self, s: int) -> None:
        lo, hi = self.ranges[s]
        grad = self._grads[lo:hi]
        codec = self._push_codecs[s]
        if codec.is_plain_dense and self.feedback is None:
            # the payload is the gradient slice itself: put it from there, no encode copy
            self._nbytes[s] = (hi - lo) * 4
            self._put_bytes(s, SLOT_HEADER, grad)
            return
        payload = self.send[s][SLOT_HEADER:]
        touched = self._shard_touched()
        if self.feedback is not None:
            nbytes = self.feedback[s].encode(grad, payload, touched, codec)
        else:
            nbytes = codec.encode(grad, payload, touched)
        self._nbytes[s] = nbytes
        self._put_bytes(s, SLOT_HEADER, payload[:nbytes])

    def _shard_touched(self):
        return self._touched if self.cfg.ps.sparse_embedding else None

    def push(self, step: int, *, weight: float, loss: float, scale: float,
             items: int, compute_s: float = 0.0) -> PushHandle:
        """Send what backward's callback has not sent yet, then the headers; ``wait`` on the
        handle flushes and raises the flags."""
        for s, rank in enumerate(self.servers):
            if self.ring is not None and step != self.pulled_version[s]:
                raise RuntimeError(f"protocol error: a bsp push of step {step} after pulling "
                                   f"version {self.pulled_version[s]} of shard {s}")
            header = self.headers[s]
            header[Header.STEP] = step
            header[Header.WEIGHT] = f2i(weight)
            header[Header.LOSS] = f2i(loss)
            header[Header.COMPUTE_S] = f2i(compute_s)
            header[Header.SCALE] = f2i(scale)
            header[Header.ITEMS] = items
            if not self._sent[s]:
                if not self._slot_is_free(s):
                    self.wait_until(lambda s=s: self._read_slot_free(s))
                self._encode_and_put(s)
                self._sent[s] = True
            header[Header.PULLED_VERSION] = self.pulled_version[s]
            header[Header.NBYTES] = self._nbytes[s]
            self._put_bytes(s, 0, header.view(np.uint8))
            self.bytes_pushed += SLOT_HEADER + self._nbytes[s]
        self._grads = None
        return PushHandle(step)
