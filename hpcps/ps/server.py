"""A server shard: owns params[lo:hi) and its optimizer state, applies pushes.

bsp: folds the pushes of step t into the step's sum as they land, in a fixed order
     (they take turns in ``ps.slots`` receive slots: ``hpcps.ps.ring``); once all P
     are in, divides by their total weight, clips with the *global* norm (sum of
     squares added across servers with a non-blocking allreduce) and applies one
     optimizer step. With backup workers (one slot per pusher) it applies step t once
     W - b pushes are in and folds late ones into the next step (``hpcps.ps.backup``).
ssp/asp: applies each slot as it arrives, one optimizer step per push, with the
     clip scale the worker computed from its full gradient, after the update rule
     (``hpcps.ps.update_rules``: delay compensation) has corrected it.

``serve`` is a server rank's whole life: apply pushes until a sync point, meet
the other ranks there (checkpoint, stop, end), repeat.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

from hpcps.errors import EXIT_OK, EXIT_PEER_DEAD, EXIT_REQUEUE
from hpcps.optim.clip import clip_coefficient
from hpcps.ps import control as C
from hpcps.ps.backup import Carry, step_is_ready, sync_boundary_ahead
from hpcps.ps.balance import SplitSearch
from hpcps.ps.control import HIST_BINS, f2i, i2f
from hpcps.ps.coordination import meet
from hpcps.ps.ring import StepSum
from hpcps.ps.shards import ShardSet
from hpcps.ps.update_rules import make_update_rule
from hpcps.ps.windows import SLOT_HEADER, Header
from hpcps.runtime import signals
from hpcps.runtime.mpi import abort, mpi, say
from hpcps.runtime.polled import PolledComm
from hpcps.runtime.wait import Backoff, Every, PeerWatch, ProgressPacer, WaitHistory

ShardSave = Callable[[dict, PolledComm, tuple], None]
"""``save(reason, comm, (lo, hi, state))``: write this shard into the collective checkpoint
of a sync point (``comm`` for the checkpoint's own collectives)."""


def serve(*, cfg, shards: ShardSet, optimizer, lr_fn: Callable[[int], float], params: np.ndarray,
          version: int, save: Optional[ShardSave] = None, split=None,
          max_norm: Optional[float] = None) -> int:
    """A server rank: apply pushes to this shard until the job stops or ends; returns the
    exit code (EXIT_OK at the end, EXIT_REQUEUE after an agreed stop). ``split``: the
    speed-balanced split saved with the checkpoint this run resumes from. ``optimizer``
    and ``lr_fn``: the update policy (the train.* optimizer and schedule, or the outer
    optimizer on local steps' deltas); ``max_norm``: bsp's global-norm clip (default
    train.grad_clip; 0: none)."""
    server = Server(cfg=cfg, shards=shards, optimizer=optimizer, lr_fn=lr_fn,
                    params_init=params, version=version, split=split, max_norm=max_norm)
    shards.roles.comm.Barrier()  # shards hold their initial params before any worker pulls
    lo, hi = shards.own_range

    def save_shard(reason: dict, comm: PolledComm) -> None:
        if save is not None:
            save(reason, comm, (lo, hi, server.snapshot()))
    while True:
        server.serve_until_sync()
        reason = meet(shards, None, server.collective_duties, save_shard)
        server.sync_open = False
        if reason["stop"]:
            return EXIT_REQUEUE
        if reason["end"]:
            return EXIT_OK


class Server:
    """One shard's owner: its params (in the params window), optimizer state, push slots
    and control words; ``serve_until_sync`` is its event loop."""

    def __init__(self, *, cfg, shards: ShardSet, optimizer, lr_fn, params_init, version: int = 0,
                 split=None, max_norm: Optional[float] = None):
        roles, wins = shards.roles, shards.wins
        self.cfg, self.roles, self.wins = cfg, roles, wins
        self.codec = shards.codecs[roles.server_index]
        # streaming local steps: round r carries fragment r mod F only (bsp)
        self.round_codecs = (shards.fragment_codecs[roles.server_index]
                             if shards.fragment_codecs is not None else None)
        self.opt, self.lr_fn = optimizer, lr_fn
        self.max_norm = cfg.train.grad_clip if max_norm is None else max_norm
        self.mode = roles.mode
        self.me = roles.world_rank
        self.index = roles.server_index
        self.coordinator = roles.servers[0]
        self.is_coordinator = self.me == self.coordinator
        self.L = wins.ctl_layout
        self.W = roles.n_workers      # watched, parked, proposing
        self.P = roles.n_pushers      # the workers, or one leader per node
        self.K = wins.n_slots         # receive slots: P, or fewer taking turns (bsp)
        self.ring = shards.ring       # bsp without backup workers: the turns (else None)
        self.params = wins.local_params
        self.params[:] = params_init  # no reader yet: workers pull after the start barrier
        self.wins.params.Sync()
        self.version = version
        self.wins.write(self.me, C.VERSION, version)
        if self.ring is not None:   # before the start barrier: no pusher has read them yet
            self.wins.write_block(self.me, self.L.slot_state, self.ring.initial_words(version))
        self.step_sum = StepSum()
        self.acc = np.zeros(self.codec.n, dtype=np.float32)
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)
        # delay compensation: corrects stale pushes (asp/ssp, and bsp's late ones)
        self.rule = make_update_rule(cfg, self.codec.n, self.W, optimizer)
        self.rule.started(version, self.params)
        # the params the optimizer steps: the window's, or the rule's private ones (then the
        # window holds what the rule publishes, e.g. lookahead's extrapolation)
        self.state = self.rule.own if self.rule.private_params else self.params
        # bsp with backup workers: late pushes wait in `carry` for the next update
        self.backup = cfg.ps.backup_workers if self.mode == "bsp" else 0
        # asp/ssp: free a push's slot only once it is applied, not once decoded: the pusher's
        # next pull waits for that (ps.read_your_writes), so it sees its own last update
        self.free_slot_when_applied = self.mode != "bsp" and cfg.ps.read_your_writes
        self.start_version = version
        self.carry = Carry(self.codec.n) if self.backup else None
        self.pushed_through = [version - 1] * self.P
        # coordinator, ps.balance = speed: the split of each step, published before the
        # version moves (workers pull after the start barrier: the first one is there)
        self.splits = None
        if cfg.ps.balance == "speed" and self.is_coordinator:
            self.splits = SplitSearch(self.W * cfg.train.batch_size, self.W,
                                      cfg.ps.balance_every, version, split)
            self.wins.write_block(self.me, self.L.split, np.array(self.splits.split, np.int64))
        self.last_update = None
        self.loss_sum = self.weight_sum = 0.0   # coordinator, asp/ssp: of the pushes applied
        # we own window memory: over a network module, others' atomics on it complete only
        # while we are inside MPI, so every wait and every long local loop calls this. On
        # one node (shared memory: nothing waits for us) long naps stay whole: 0.2 ms slices
        # would wake us 5,000 times a second and take the core from a worker's GEMMs
        # (bsp 1 server + 1 worker: 1.06x -> 1.19x of one process's step time)
        self.progress = ProgressPacer(wins.progress)
        self.wait_progress = self.progress if roles.n_nodes > 1 else None
        self.backoff = Backoff(progress=self.wait_progress)
        self.beat = Every(0.2)
        self.watch_tick = Every(0.25)
        self.epoch_tick = Every(0.002)
        self.sync_epoch = 0
        self.sync_open = False
        self.watch = PeerWatch(range(self.W), cfg.ps.heartbeat_timeout, cfg.ps.dead_timeout)
        self.excluded = np.zeros(self.W, dtype=np.int64)
        self.rr = 0  # round-robin start for async fairness
        # bsp: how long after an update the next step's pushes took to arrive (the workers'
        # compute time); the server sleeps through most of it in a few long naps
        self.push_gaps = WaitHistory()
        self.idle_since = None
        self.stop_forwarded = False

    # -- duties done in every wait -------------------------------------------------
    def duties(self, at_sync_point: bool = False) -> None:
        """Heartbeat, forward a stop signal to the coordinator, and (coordinator) watch the
        workers. ``at_sync_point``: every rank is gathering, so in any mode a dead worker
        would hang the collective and ends the job."""
        now = time.monotonic()
        if self.beat.due(now):
            self.wins.add(self.me, C.HEARTBEAT, 1)
        self._forward_stop_request()
        if self.is_coordinator and self.watch_tick.due(now):
            self._watch_workers(now, abort_dead=at_sync_point)

    def collective_duties(self) -> None:
        self.duties(at_sync_point=True)

    def _forward_stop_request(self) -> None:
        """A signal that reaches a server (Slurm signals every rank) raises STOP_REQUEST on
        the coordinator like a worker's would."""
        if not self.stop_forwarded and signals.stop_requested():
            self.wins.write(self.coordinator, C.STOP_REQUEST, 1)
            self.stop_forwarded = True

    def _watch_workers(self, now: float, abort_dead: bool = False) -> None:
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
            if (abort_dead or self.mode == "bsp") and self.watch.is_dead(w, now):
                abort(self.roles.comm, EXIT_PEER_DEAD,
                      f"worker rank {rank} ({self.roles.hosts[rank]}) silent for "
                      f"{self.watch.silent_for(w, now):.0f} s (ps.dead_timeout = "
                      f"{self.cfg.ps.dead_timeout:g}) in {'a sync point' if abort_dead else 'bsp'};"
                      " aborting the job")
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
                if self.carry is not None and self.carry.count:
                    self._apply_carry_alone()
                self._publish_true_params()
                self.sync_epoch = self.wins.read(self.coordinator, C.SYNC_EPOCH)
                self.idle_since = None  # the collective's time is no push gap
                return self.sync_epoch
            if progressed:
                # bsp, after an update: nap through most of the workers' compute; after a
                # fold, poll for the step's other pushes
                moved = self.mode == "bsp" and self.step_sum.count == 0
                self.backoff.reset(self.push_gaps.expect() if moved else 0.0)
            else:
                self.backoff.pause()

    def _publish_true_params(self) -> None:
        """At a sync point workers read (and the checkpoint saves) the true params."""
        if self.state is not self.params:
            self.wins.begin_write(self.duties)
            self.params[:] = self.state
            self.wins.end_write()

    def slot_states(self) -> np.ndarray:
        L = self.L
        return self.wins.read_block(self.me, L.slot_state, L.slot_state + self.K)

    def apply_pending(self) -> bool:
        states = self.slot_states()
        if self.ring is not None:
            return self._fold_arrivals(states)
        if self.mode == "bsp":
            return self._apply_bsp_with_backup(states)
        full = np.nonzero(states == 1)[0]
        if len(full) == 0:
            return False
        order = sorted(int(p) for p in full)
        order = [p for p in order if p >= self.rr] + [p for p in order if p < self.rr]
        for p in order:
            self._apply_async(p)
        self.rr = (order[-1] + 1) % self.P
        return True

    def _headers(self, pushers) -> list[np.ndarray]:
        self.wins.slots.Sync()  # make the pushers' completed Puts visible to local loads
        return [self.wins.local_slot(p)[:SLOT_HEADER].view(np.int64).copy() for p in pushers]

    def _payload(self, p: int, nbytes: int) -> np.ndarray:
        return self.wins.local_slot(p)[SLOT_HEADER:SLOT_HEADER + nbytes]

    # -- bsp: a step's pushes folded in ticket order (hpcps.ps.ring) --------------------
    def _fold_arrivals(self, words: np.ndarray) -> bool:
        """Fold the step's pushes that have landed, in ticket order (the sum adds them in
        the same order whatever the arrival order); apply the step once all P are in."""
        ring, total = self.ring, self.step_sum
        progressed = False
        while total.count < self.P:
            ticket = ring.ticket(self.version, total.count)
            slot = ring.slot(ticket)
            if words[slot] != ring.full_word(ticket):
                break   # (a slot freed in this loop reads stale here: the next poll sees it)
            self._fold(ticket, slot)
            progressed = True
        if total.count == self.P:
            self._apply_step_sum()
        return progressed

    def _fold(self, ticket: int, slot: int) -> None:
        """Add one push to the step's sum and free its slot for ticket + k (one pusher with
        a plain fp32 push: keep it where it lies; the update reads it and then frees it)."""
        total = self.step_sum
        if total.count == 0 and self.idle_since is not None:
            self.push_gaps.add(time.monotonic() - self.idle_since)  # the workers' compute
        head = self._headers([slot])[0]
        if int(head[Header.STEP]) != self.version:
            abort(self.roles.comm, 1, f"protocol error: server {self.index} at step "
                  f"{self.version} got a push for step {int(head[Header.STEP])} in slot {slot}")
        payload = self._payload(slot, int(head[Header.NBYTES]))
        codec = self._round_codec()
        weight = i2f(head[Header.WEIGHT])
        if self.P == 1 and codec.is_plain_dense:
            total.in_place = (payload.view(np.float32), slot, ticket)
        else:
            if total.count == 0:
                self.acc.fill(0.0)
            # one pusher: its push is the step's gradient (no weighting to undo)
            codec.decode_add(payload, self.acc, weight if self.P > 1 else 1.0)
            self.wins.write(self.me, self.L.slot_state + slot, self.ring.free_word(ticket + self.K))
        self._observe_push(total.count, head)
        total.add(weight, i2f(head[Header.LOSS]), int(head[Header.ITEMS]))
        self.progress()

    def _apply_step_sum(self) -> None:
        """All P pushes of the step are folded: their weighted mean is the step's gradient."""
        total = self.step_sum
        release = ()
        if total.in_place is not None:
            grad, slot, ticket = total.in_place
            release = ((slot, self.ring.free_word(ticket + self.K)),)
        else:
            grad = self.acc
            if self.P > 1:
                grad *= np.float32(1.0 / total.weight)
        self._finish_step(grad, total.loss / total.weight, total.items, release)
        total.clear()
        self.idle_since = time.monotonic()

    def _round_codec(self):
        """This step's push encoding (streaming local steps: the round's fragment)."""
        if self.round_codecs is None:
            return self.codec
        return self.round_codecs[self.version % len(self.round_codecs)]

    def _observe_push(self, p: int, head) -> None:
        """A push of pusher p for this step: its staleness, and its speed for the balancer."""
        self.hist[min(max(0, self.version - int(head[Header.PULLED_VERSION])), HIST_BINS - 1)] += 1
        self.pushed_through[p] = self.version
        if self.splits is not None:
            self.splits.observe_push(p, i2f(head[Header.COMPUTE_S]), int(head[Header.STEP]))

    # -- bsp with backup workers: one slot per pusher, late pushes carried ----------------
    def _apply_bsp(self, pushers: list) -> None:
        """Update ``version`` from the pushes of its step in ``pushers``' slots and the late
        pushes carried."""
        if self.idle_since is not None:
            self.push_gaps.add(time.monotonic() - self.idle_since)
        heads = self._headers(pushers)
        steps = {int(h[Header.STEP]) for h in heads}
        if steps != {self.version}:
            abort(self.roles.comm, 1, f"protocol error: server {self.index} at step {self.version} "
                  f"got pushes for steps {sorted(steps)}")
        carry = self.carry if self.carry is not None and self.carry.count else None
        weights = np.array([i2f(h[Header.WEIGHT]) for h in heads])
        total = float(weights.sum()) + (carry.weight if carry else 0.0)
        grad = self._weighted_mean(pushers, heads, weights / total)
        loss_sum = sum(weights[i] * i2f(heads[i][Header.LOSS]) for i in range(len(heads)))
        items = sum(int(h[Header.ITEMS]) for h in heads)
        if carry:
            grad += carry.acc * np.float32(1.0 / total)
            loss_sum += carry.loss
            items += carry.items
        for p, h in zip(pushers, heads):
            self._observe_push(p, h)
        self._finish_step(grad, float(loss_sum / total), items, [(p, 0) for p in pushers])
        if carry:
            carry.clear()
        self.idle_since = time.monotonic()

    def _finish_step(self, grad, loss: float, items: int, release) -> None:
        """Clip the step's gradient by the global norm, publish the step's stats and update;
        ``release``: (slot, word) pairs to write once the update has read the slots."""
        total_sumsq = self._allreduce_servers(float(grad @ grad))
        norm, scale = clip_coefficient(total_sumsq, self.max_norm)
        # the step's stats and staleness counts are published before the version moves (the
        # lead worker reads them right after its push, while this server updates)
        self.wins.add_block(self.me, self.L.hist, self.hist)
        self.hist[:] = 0
        if self.splits is not None:   # every worker reads it after pulling the next version
            now = time.monotonic()
            if self.last_update is not None:
                self.splits.observe_step(self.version, now - self.last_update)
            self.last_update = now
            before = self.splits.split
            if self.splits.next_split(self.version + 1) != before:
                self.wins.write_block(self.me, self.L.split,
                                      np.array(self.splits.split, np.int64))
        self.wins.add(self.me, C.APPLIED, items)   # before the stats: the lead reads both after
        if self.is_coordinator:
            self.wins.write_block(self.me, C.LAST_LOSS,
                                  np.array([f2i(loss), f2i(norm), self.version + 1], dtype=np.int64))
        self._update(grad, self.lr_fn(self.version), scale, release=release)

    def _apply_bsp_with_backup(self, states) -> bool:
        """Carry every late push at once (its slot is freed for the next step), then apply
        the step when ``step_is_ready`` says so."""
        full = [int(p) for p in np.nonzero(states == 1)[0]]
        if not full:
            return False
        progressed = False
        fresh = []
        for p, head in zip(full, self._headers(full)):
            step = int(head[Header.STEP])
            if step == self.version:
                fresh.append(p)
            elif step == self.version - 1:
                self._carry_late(p, head)
                progressed = True
            else:
                abort(self.roles.comm, 1, f"protocol error: server {self.index} at step "
                      f"{self.version} got a push of step {step} from pusher {p}")
        need_all = sync_boundary_ahead(self.cfg, self.version + 1, self.start_version)
        if step_is_ready(self.version, len(fresh), self.pushed_through, self.backup, need_all):
            self._apply_bsp(fresh)
            return True
        return progressed

    def _carry_late(self, p: int, head) -> None:
        """Decode a push of the previous step into the carry (delay-compensated against the
        params it missed) and free its slot."""
        self.acc.fill(0.0)
        self.codec.decode_add(self._payload(p, int(head[Header.NBYTES])), self.acc, 1.0)
        pulled = int(head[Header.PULLED_VERSION])
        factor = self.rule.correct(self.acc, pulled, self.version, self.state, self.progress)
        weight = i2f(head[Header.WEIGHT])
        self.carry.acc += self.acc * np.float32(weight * factor)
        self.carry.add(weight, i2f(head[Header.LOSS]), int(head[Header.ITEMS]))
        self.hist[min(max(0, self.version - pulled), HIST_BINS - 1)] += 1
        self.pushed_through[p] = self.version - 1
        self.wins.write(self.me, self.L.slot_state + p, 0)

    def _apply_carry_alone(self) -> None:
        """An agreed stop left late pushes carried: apply them in one extra update before
        the checkpoint (same clip rule, the learning rate of their step; the version stays,
        so the sync point's step and version still agree)."""
        carry = self.carry
        grad = carry.acc * np.float32(1.0 / carry.weight)
        norm, scale = clip_coefficient(self._allreduce_servers(float(grad @ grad)),
                                       self.max_norm)
        self.wins.add_block(self.me, self.L.hist, self.hist)
        self.hist[:] = 0
        self.wins.add(self.me, C.APPLIED, carry.items)
        self._update(grad, self.lr_fn(self.version - 1), scale, move_version=False)
        if self.is_coordinator:   # the step records were written before: say it here
            say(f"hpcps: sync point at step {self.version}: {carry.count} late push(es), "
                f"{carry.items} sequences, applied in one extra update before the meeting")
        carry.clear()

    def _weighted_mean(self, pushers, heads, shares) -> np.ndarray:
        """sum_i shares[i] * push of pushers[i]. A single plain fp32 push is used where it
        lies in its slot (no copy); the slot is released only after the update has read it."""
        payloads = [self._payload(p, int(h[Header.NBYTES])) for p, h in zip(pushers, heads)]
        codec = self._round_codec()
        if len(payloads) == 1 and codec.is_plain_dense and shares[0] == 1.0:
            return payloads[0].view(np.float32)
        self.acc.fill(0.0)
        for payload, share in zip(payloads, shares):
            codec.decode_add(payload, self.acc, share)
            self.progress()
        return self.acc

    def _apply_async(self, p: int) -> None:
        head = self._headers([p])[0]
        self.acc.fill(0.0)
        self.codec.decode_add(self._payload(p, int(head[Header.NBYTES])), self.acc, 1.0)
        if not self.free_slot_when_applied:
            self.wins.write(self.me, self.L.slot_state + p, 0)  # decoded: the pusher may refill it
        pulled = int(head[Header.PULLED_VERSION])
        self.hist[min(max(0, self.version - pulled), HIST_BINS - 1)] += 1
        # the params only change here, so the rule may read them outside the gate
        factor = self.rule.correct(self.acc, pulled, self.version, self.state, self.progress)
        self._update(self.acc, self.lr_fn(int(head[Header.STEP])) * factor,
                     i2f(head[Header.SCALE]))
        if self.free_slot_when_applied:   # the version moved: the pusher may pull (and refill)
            self.wins.write(self.me, self.L.slot_state + p, 0)
        self.wins.add_block(self.me, self.L.hist, self.hist)
        self.hist[:] = 0
        if self.is_coordinator:  # the running loss of the pushes applied (sample-budget records)
            weight = i2f(head[Header.WEIGHT])
            self.loss_sum += weight * i2f(head[Header.LOSS])
            self.weight_sum += weight
            self.wins.write_block(self.me, C.LOSS_SUM,
                                  np.array([f2i(self.loss_sum), f2i(self.weight_sum)], np.int64))
        self.wins.add(self.me, C.APPLIED, int(head[Header.ITEMS]))

    def _update(self, grad, lr: float, scale: float, release=(), move_version: bool = True) -> None:
        """One optimizer step with the params gate closed; the version moves inside it, so
        a pull that reads VERSION after entering the gate gets exactly that version's params.
        ``release`` (bsp): (slot, word) pairs freeing the slots the step may have read from,
        written after the step and before the version moves (a pusher that sees t+1 finds
        its slot free)."""
        self.wins.begin_write(self.duties)
        if self.state is not self.params:
            self.params[:] = self.state   # the window keeps the params before this update
        self.opt.step(self.state, grad, lr, scale, between=self.progress)
        if self.state is not self.params:
            self.rule.publish(self.params, self.state, self.progress)
        # backup workers: a slot left out may be filling right now; leave it alone
        for slot, word in release:
            self.wins.write(self.me, self.L.slot_state + slot, word)
        if move_version:
            self.version += 1
            self.wins.write(self.me, C.VERSION, self.version)
        self.wins.end_write()
        self.rule.applied(self.version, self.state, self.progress)

    def _allreduce_servers(self, value: float) -> float:
        comm = self.roles.server_comm
        if comm.Get_size() == 1:
            return value
        MPI = mpi()
        send = np.array([value], dtype=np.float64)
        recv = np.empty(1, dtype=np.float64)
        req = comm.Iallreduce(send, recv, op=MPI.SUM)
        backoff = Backoff(progress=self.wait_progress)
        while not req.Test():
            self.duties()  # keep heartbeating and watching while other shards catch up
            backoff.pause()
        return float(recv[0])

    # -- state for checkpoints -----------------------------------------------------
    def snapshot(self) -> dict:
        """The shard's state for a checkpoint, as views: the writer copies what a background
        save must keep while training goes on, and a final save (stop, end) copies nothing
        (a copy here would hold the shard's params and optimizer state twice)."""
        state = dict(self.opt.state())
        state["params"] = self.state
        state["version"] = self.version
        return state

