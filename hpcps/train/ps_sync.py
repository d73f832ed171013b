"""The parameter-server strategy (bsp, ssp, asp): a ``StepSync`` over ``hpcps.ps``.

The data path is ``PSClient`` (pull and push handles), the control protocol is
``WorkerCoordination`` (stop agreement, ssp bound, parking, liveness); this class
adds what only training knows: where to clip, the statistics of a step, what goes
into a checkpoint, and which sequences this worker computes:

- bsp: its slice of each step's global batch, equal or speed-balanced
  (``ps.balance = speed``, ``hpcps.ps.balance``);
- asp/ssp with a sample budget (``ps.budget``): batches claimed one at a time from
  the global sample stream. Claim k (an atomic add on the coordinator's CLAIMED) is
  items [(k mod W)·b, (k mod W + 1)·b) of global step k div W, so the job trains on
  exactly the sequences bsp would, and the learning rate follows the samples
  consumed. Batches are handed out up to the next sync point (checkpoint, end or an
  agreed stop); the first claim past it is void and its worker parks there. Every
  worker makes exactly one void claim per sync point, so after m meetings claim number
  r is batch r - m·W (counted from the step the job started at).

With ``ps.hierarchy = "node"`` a ``NodeGroup`` sits in between: the node's leader pulls
and pushes for its node's workers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hpcps.optim.clip import clip_coefficient
from hpcps.ps.balance import slice_of
from hpcps.ps.client import PSClient
from hpcps.ps.coordination import WorkerCoordination
from hpcps.ps.node import NodeGroup
from hpcps.ps.options import samples_budget
from hpcps.ps.shards import ShardSet
from hpcps.runtime.wait import wait_until
from hpcps.train.sync import GradReady, Work, ignore_grad_ready


class PSSync:
    """A worker of a parameter-server job (see the module docstring)."""

    def __init__(self, *, cfg, shards: ShardSet, params: np.ndarray, checkpointer=None,
                 worker_state: Optional[dict] = None, node: Optional[NodeGroup] = None,
                 start_step: int = 0, clip_pushes: bool = True):
        roles = shards.roles
        self.cfg, self.checkpointer, self.node = cfg, checkpointer, node
        self.fragments = shards.fragments   # streaming local steps: each fragment's ranges
        self.mode = roles.mode
        self.is_lead = roles.world_rank == roles.lead_worker
        self.coordination = WorkerCoordination(cfg, shards)
        self.W, self.w, self.b = roles.n_workers, roles.worker_index, cfg.train.batch_size
        self.start_step = start_step
        # asp/ssp clip each gradient pushed; a local-steps delta is no gradient to clip
        self.push_clip = cfg.train.grad_clip if clip_pushes else 0.0
        self.pushes = 0                 # this worker's pushes in this job: its ssp clock
        # bsp speed balance: the coordinator publishes each step's split
        self.balance = cfg.ps.balance == "speed"
        # sample budget (asp/ssp): see the module docstring
        self.samples_budget = samples_budget(cfg, self.mode)
        self.claim_base = start_step * self.W
        self.meetings = 0
        self.position = start_step      # the earliest boundary this worker can stop at
        self.boundary = (start_step, False)
        # the workers that talk to the servers: all of them, or one leader per node
        self.client = None
        if node is None or node.is_leader:
            self.client = PSClient(cfg=cfg, shards=shards, params=params,
                                   duties=self.coordination.duties)
            if worker_state:
                self.client.load_residual(worker_state.get("residual"))

    @staticmethod
    def node_group(roles, n_params: int) -> Optional[NodeGroup]:
        """The worker's node group when ``ps.hierarchy = "node"`` (collective over the
        workers; its duties are this worker's heartbeats, set once the sync exists)."""
        return NodeGroup(roles, n_params) if roles.hierarchy == "node" else None

    def should_stop(self, step: int) -> bool:
        return self.coordination.should_stop(step)

    def assign(self, step: int) -> Work:
        """This worker's slice of step ``step``: equal, or the speed-balanced split the
        coordinator published for it before its version moved (``hpcps.ps.balance``)."""
        if not self.balance:
            return Work(step, self.w * self.b, (self.w + 1) * self.b)
        return Work(step, *slice_of(self.coordination.split(), self.w))

    def claim(self, limit: int) -> Optional[Work]:
        """Sample budget: the next batch before boundary ``limit`` (see the module docstring);
        None when this worker reached its sync point, then ``boundary`` = (step, stop)."""
        W = self.W

        def claims_end(stop_at: Optional[int]) -> int:
            end = limit if stop_at is None else min(limit, stop_at)
            return end * W - self.claim_base + W * self.meetings
        self.coordination.should_stop(self.position, clock=self.pushes, claims_end=claims_end)
        index = self.claim_base + self.coordination.claim() - W * self.meetings
        step, slot = divmod(index, W)
        self.coordination.claimed(step)
        stop_at = self.coordination.agreed_stop(step)
        end = limit if stop_at is None else min(limit, stop_at)
        if step >= end:
            self.boundary = (end, end == stop_at)
            return None
        self.position = max(self.position, step + 1)
        self.coordination.started(self.pushes)
        return Work(step, slot * self.b, (slot + 1) * self.b)

    def applied_through(self, step: int) -> tuple[int, float, float]:
        """Sample budget, lead: the job-wide applied totals (items, sum of weight * loss,
        sum of weight) once every batch of the steps before sync point ``step`` is applied.
        Each of those batches was claimed, and its worker pushes it before it meets at
        ``step``, so this wait ends without the lead's help."""
        need = (step - self.start_step) * self.W * self.b
        wait_until(lambda: self.coordination.applied_totals()[0] >= need,
                   self.coordination.duties)
        return self.coordination.applied_totals()

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        def save(agreed: dict, comm) -> None:
            if self.checkpointer is not None:
                self.checkpointer.save(step, shard=None, worker=worker_state, reason=agreed,
                                       comm=comm)
        agreed = self.coordination.park_and_meet(step, reason, save)
        if self.samples_budget:   # every worker made its one void claim of this sync point
            self.meetings += 1
            self.position = step
        return agreed

    def before_meet(self, step: int) -> dict:
        return {}   # every push of this strategy is complete when push returns

    def params_to_evaluate(self, params):
        return params

    def pull(self, step: int) -> None:
        if self.client is not None:
            self.pull_from_servers(step)
        if self.node is not None:   # the leader publishes what it pulled; the others wait
            if self.node.is_leader:
                self.node.params_published(step)
            else:
                self.node.wait_for_params(step, self.coordination.duties)

    def pull_from_servers(self, version: int, fragment: Optional[int] = None) -> None:
        """Talking worker: pull every shard (or one fragment of each) into the params
        buffer (bsp: once the shard holds ``version``), without the node's publishing."""
        self.client.wait(self.client.pull(version, fragment))

    def start_push(self, grads, touched) -> GradReady:
        if self.node is not None:
            return ignore_grad_ready   # the node's sum is pushed after every backward ended
        return self.client.start_push(grads, touched)

    def push(self, step: int, grads, weight: float, loss: float, items: int,
             compute_s: float = 0.0) -> dict:
        self.pushes += 1
        if self.node is None:
            stats = self._to_servers(step, grads, weight, loss, items, compute_s)
        else:
            self.node.hand_in(step, grads, weight, loss, items)
            if self.node.is_leader:
                node_grads, weight, loss, items = self.node.node_gradient(
                    step, self.coordination.duties)
                self.client.start_push(node_grads, None)
                stats = self._to_servers(step, node_grads, weight, loss, items, compute_s)
                self.node.pushed(step)
            else:
                self.node.wait_until_pushed(step, self.coordination.duties)
                stats = {"loss": loss, "grad_norm": None}
        return self._pushed(step, stats)

    def push_prepared(self, step: int, buf, weight: float, loss: float, items: int,
                      compute_s: float = 0.0, fragment: Optional[int] = None) -> dict:
        """Talking worker: push ``buf`` (e.g. a local-steps delta, already reduced over the
        node; with ``fragment`` only that fragment of it) straight to the servers as the push
        of ``step``; returns its statistics."""
        self.pushes += 1
        self.client.start_push(buf, None, fragment)
        return self._pushed(step, self._to_servers(step, buf, weight, loss, items, compute_s))

    def _pushed(self, step: int, stats: dict) -> dict:
        """After a push: publish the clock; the lead adds what the servers published."""
        self.coordination.pushed(step, self.pushes if self.samples_budget else None)
        if self.is_lead:
            if self.mode == "bsp":  # the aggregate's loss and norm, published by the coordinator
                stats.update(self.coordination.step_stats(step))
                if self.balance:   # published with the stats: the next step's split, which
                    stats["split"] = self.coordination.split()   # a resumed run restores
            stats.update(self.job_progress())
        return stats

    def job_progress(self) -> dict:
        """Lead: what the servers applied job-wide since the last call (staleness counts,
        items) and, with a sample budget, the running totals the records follow."""
        stats = self.coordination.staleness()
        stats["items_applied"] = self.coordination.items_applied()
        if self.samples_budget:
            stats["applied_totals"] = self.coordination.applied_totals()
        return stats

    def pulled_version(self) -> int:
        """The oldest shard version the last pull read (bsp: the steps or rounds applied)."""
        return min(self.client.pulled_version)

    def _to_servers(self, step: int, grads, weight: float, loss: float, items: int,
                    compute_s: float) -> dict:
        norm, scale = None, 1.0
        if self.mode != "bsp":  # no global aggregate to clip: clip this pusher's gradient
            norm, scale = clip_coefficient(float(grads @ grads), self.push_clip)
        self.client.wait(self.client.push(step, weight=weight, loss=loss, scale=scale,
                                          items=items, compute_s=compute_s))
        return {"loss": loss, "grad_norm": norm}

    def traffic(self) -> dict:
        if self.client is None:
            return {}
        out = self.client.take_traffic()
        if self.node is not None:
            out["traffic_scope"] = "node"
        return out

    def worker_state(self) -> dict:
        residual = self.client.residual() if self.client is not None else None
        return {} if residual is None else {"residual": residual}

    def close(self) -> None:
        """Collective over the workers with a node group (every worker ends together)."""
        self.coordination.close()
        if self.node is not None:
            self.node.close()
