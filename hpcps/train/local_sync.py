"""Local steps with an outer optimizer on the servers (``ps.local_steps = H``, DiLoCo family).

Each worker owns a replica: the params the model reads, and an inner optimizer (the
``train.*`` optimizer, schedule and clipping) that steps them after every backward,
without talking to anyone. A *round* is H inner steps. At its start the worker pulls
the global params (and keeps them as the round's ``anchor``); at its end it pushes the
pseudo-gradient ``delta = anchor - replica`` through the ordinary ``PSSync`` (same
windows, encodings, error feedback), with the round's summed weight, mean loss and
items. The servers step the global params with the outer optimizer
(``hpcps.optim.outer``) on it:

- bsp: synchronous rounds. The servers wait for every worker's delta of round r,
  take the sample-weighted mean and apply one outer step; the server version counts
  rounds, so a worker's round index is the version it pulled.
- asp: each delta is applied on arrival (delayed Nesterov), and with
  ``ps.dynamic_local_steps`` a worker's round is H x (fastest published mean step time /
  its own) steps long, so slow workers' deltas are about as fresh as fast ones'.

A sync point (checkpoint, stop, end) closes the open round (``before_meet``): its delta
is pushed before the checkpoint's worker state is taken, so a checkpoint holds the
global params and outer state on the servers and, per worker, only the inner optimizer
state; after the meeting every worker pulls and a new round starts. Resumed runs
therefore reproduce an uninterrupted one exactly (the sync points are the same).

Inner steps move no bytes: ``push_mb``/``pull_mb`` in the records are the bytes of the
round's pull and push, on the steps where they happen.
"""

from __future__ import annotations

import numpy as np

from hpcps.optim import make_optimizer
from hpcps.optim.clip import clip_coefficient
from hpcps.train.ps_sync import PSSync
from hpcps.train.sync import GradReady, ignore_grad_ready

INNER = "inner_"   # prefix of the inner optimizer's state in the worker's checkpoint file


def dynamic_round_length(H: int, own_step_s: float, published_s: np.ndarray) -> int:
    """asp, ``ps.dynamic_local_steps``: H scaled by this worker's mean step time against
    the fastest one published (0 = not yet known), so every worker's round takes about the
    time of the fastest worker's H steps; H until both are known, at least 1."""
    known = published_s[published_s > 0]
    if own_step_s <= 0 or len(known) == 0:
        return H
    return max(1, int(round(H * float(known.min()) / own_step_s)))


class LocalStepsSync:
    """A worker with local steps (see the module docstring): a ``StepSync`` over ``ps``.

    With ``ps.hierarchy = node`` the node's workers form one replica: each inner step they
    hand their gradients to the node's shared-memory window, the node's leader takes their
    weighted mean, steps the node's one inner optimizer on the shared params and publishes
    them; only the leader pulls, keeps the anchor and pushes the node's delta."""

    def __init__(self, *, cfg, ps: PSSync, params: np.ndarray, layout, lr_fn,
                 saved: dict):
        self.cfg, self.ps, self.params, self.lr_fn = cfg, ps, params, lr_fn
        self.H = cfg.ps.local_steps
        self.samples_budget = ps.samples_budget
        self.is_lead = ps.is_lead
        self.node = ps.node
        self.duties = ps.coordination.duties
        # who owns the replica's optimizer and talks to the servers: every worker, or the
        # node's leader (its node's params are the shared ones every local worker reads)
        self.owns_replica = self.node is None or self.node.is_leader
        self.dynamic = ps.mode == "asp" and cfg.ps.dynamic_local_steps
        self.inner = self.anchor = None
        if self.owns_replica:
            self.inner = make_optimizer(cfg, layout.total, layout.decay_ranges())
            inner_state = {k[len(INNER):]: v for k, v in saved.items() if k.startswith(INNER)}
            if inner_state:
                self.inner.load_state(inner_state)
            # the global params the round started from; at the round's end the delta is
            # computed in place (the next round pulls a new anchor anyway)
            self.anchor = np.empty_like(params)
        # streaming (ps.fragments = F > 1, bsp): every H / F steps one fragment syncs, in
        # turn; round r carries fragment r mod F. ``delta`` is zero outside the fragment
        # pushed (error feedback keeps the other fragments' residuals as they are)
        self.fragments = ps.fragments if self.owns_replica else None
        self.delta = np.zeros_like(params) if self.fragments else None
        self.fragment_drift = [0] * len(self.fragments) if self.fragments else []
        self.round_length = self.H // len(self.fragments) if self.fragments else self.H
        self._open_round()
        self.round_open = False     # False: the next pull is a whole pull of the global params
        self.next_round = 0         # bsp: the round whose params the next pull waits for
        self.step_time_sum = 0.0    # this replica's compute seconds over its inner steps
        self.steps_timed = 0

    def _open_round(self) -> None:
        self.weight = self.loss_sum = self.compute_s = 0.0
        self.items = 0
        self.steps_in_round = 0

    # -- what passes straight through to the parameter-server strategy -------------------
    def should_stop(self, step: int) -> bool:
        return self.ps.should_stop(step)

    def assign(self, step: int):
        return self.ps.assign(step)

    def claim(self, limit: int):
        return self.ps.claim(limit)

    @property
    def boundary(self):
        return self.ps.boundary

    def applied_through(self, step: int):
        return self.ps.applied_through(step)

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        return self.ps.meet(step, reason, worker_state)

    def traffic(self) -> dict:
        return self.ps.traffic()

    def close(self) -> None:
        self.ps.close()

    # -- rounds --------------------------------------------------------------------------
    def pull(self, step: int) -> None:
        """At a round's start: pull the global params into the replica and keep them as
        the anchor. Inside a round the replica is the worker's own. A node's leader
        publishes the node's params for ``step`` either way; the others wait for them."""
        if self.owns_replica and not self.round_open:
            # bsp waits for the round it pushed last to be applied (at the start: whatever
            # the servers hold, e.g. the rounds of the run this one resumes)
            self.ps.pull_from_servers(self.next_round)
            self.anchor[...] = self.params
            self.round_open = True
            self.fragment_drift = [0] * len(self.fragment_drift)
            self.next_round = self.ps.pulled_version() if self.ps.mode == "bsp" else 0
            if self.dynamic:
                self.round_length = self._dynamic_length()
        if self.node is not None:
            if self.node.is_leader:
                self.node.params_published(step)
            else:
                self.node.wait_for_params(step, self.duties)

    def _dynamic_length(self) -> int:
        mine = self.step_time_sum / self.steps_timed if self.steps_timed else 0.0
        return dynamic_round_length(self.H, mine, self.ps.coordination.step_times())

    def start_push(self, grads, touched) -> GradReady:
        return ignore_grad_ready   # the inner step needs the whole gradient

    def params_to_evaluate(self, params):
        """Evaluation reads the global params: the replica's at a round's start (where
        every scheduled evaluation of bsp falls when eval_every is a multiple of H), else
        the anchor, the global params of this round."""
        if self.owns_replica and self.round_open and self._drifted():
            return self.anchor
        return params

    def _drifted(self) -> bool:
        """The replica took inner steps that the servers have not seen yet."""
        return any(self.fragment_drift) if self.fragments else self.steps_in_round > 0

    def push(self, step: int, grads, weight: float, loss: float, items: int,
             compute_s: float = 0.0) -> dict:
        """One inner step on the replica; at the round's end the delta goes to the servers."""
        if self.node is not None:
            self.node.hand_in(step, grads, weight, loss, items)
            if not self.node.is_leader:   # the leader steps the node's replica
                self.node.wait_until_pushed(step, self.duties)
                return {"loss": loss, "grad_norm": None}
            grads, weight, loss, items = self.node.node_gradient(step, self.duties)
        norm, scale = clip_coefficient(float(grads @ grads), self.cfg.train.grad_clip)
        self.inner.step(self.params, grads, self.lr_fn(step), scale)
        self.weight += weight
        self.loss_sum += weight * loss
        self.items += items
        self.compute_s += compute_s
        self.steps_in_round += 1
        self.fragment_drift = [d + 1 for d in self.fragment_drift]
        self.step_time_sum += compute_s
        self.steps_timed += 1
        stats = {"loss": loss, "grad_norm": norm}
        if self.steps_in_round >= self.round_length:
            stats.update(self._push_fragment(step) if self.fragments else self._push_round(step))
        elif self.is_lead and self.ps.mode != "bsp":
            stats.update(self.ps.job_progress())   # what the others' rounds applied meanwhile
        if self.node is not None:
            self.node.pushed(step)   # the node's params are stepped: its workers go on
        return stats

    def before_meet(self, step: int) -> dict:
        """A sync point closes the open round: its delta counts before the meeting."""
        stats: dict = {}
        if self.owns_replica and self.fragments:   # in round order, until none drifted
            while self._drifted():
                stats = self._push_fragment(step - 1)
        elif self.owns_replica and self._drifted():
            stats = self._push_round(step - 1)
        self.round_open = False
        return stats

    def _push_round(self, step: int) -> dict:
        """Push delta = anchor - replica for the round ending with ``step``."""
        delta = np.subtract(self.anchor, self.params, out=self.anchor)
        mean_loss = self.loss_sum / self.weight if self.weight else 0.0
        steps = self.steps_in_round
        if self.dynamic:
            self.ps.coordination.publish_step_time(self.step_time_sum / self.steps_timed)
        round_index = self.next_round if self.ps.mode == "bsp" else step
        stats = self.ps.push_prepared(round_index, delta, self.weight, mean_loss, self.items,
                                      self.compute_s)
        self.next_round = round_index + 1
        self._open_round()
        self.round_open = False
        return self._round_record(stats, steps)

    def _round_record(self, stats: dict, steps: int, **extra) -> dict:
        """What the step record adds for a round's push: its inner steps and, for the lead,
        what the servers published (bsp: the round's mean loss over all workers and the
        outer norm; a round's items are left out, they would spike one record's tokens/s)."""
        out = {"round_steps": steps, **extra}
        if self.is_lead:
            out.update({k: v for k, v in stats.items() if k not in ("loss", "grad_norm")})
            if self.ps.mode == "bsp":
                out["round_loss"], out["outer_norm"] = stats["loss"], stats["grad_norm"]
                out.pop("items_applied", None)
        return out

    def _push_fragment(self, step: int) -> dict:
        """Streaming: push fragment r mod F's delta as round r, pull the fragment back once
        the servers applied it; the replica's other fragments go on from where they are."""
        r = self.next_round
        f = r % len(self.fragments)
        ranges = self.fragments[f]
        for a, b in ranges:
            np.subtract(self.anchor[a:b], self.params[a:b], out=self.delta[a:b])
        # a sync point syncs fragments with no step since their last push: equal weights
        weight = self.weight if self.weight > 0 else 1.0
        mean_loss = self.loss_sum / self.weight if self.weight else 0.0
        steps = self.steps_in_round
        stats = self.ps.push_prepared(r, self.delta, weight, mean_loss, self.items,
                                      self.compute_s, fragment=f)
        self.ps.pull_from_servers(r + 1, fragment=f)
        for a, b in ranges:
            self.delta[a:b] = 0.0
            self.anchor[a:b] = self.params[a:b]
        self.next_round = r + 1
        self.fragment_drift[f] = 0
        self._open_round()
        return self._round_record(stats, steps, fragment=f)

    def worker_state(self) -> dict:
        """The inner optimizer's state (its replica is the global params after the sync
        point's pull), plus the parameter-server strategy's (error-feedback residual)."""
        state = {}
        if self.inner is not None:
            state = {INNER + k: v for k, v in self.inner.state().items()}
        state.update(self.ps.worker_state())
        return state
