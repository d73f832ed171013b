"""The parameter-server strategy (bsp, ssp, asp): a ``StepSync`` over ``hpcps.ps``.

The data path is ``PSClient`` (pull and push handles), the control protocol is
``WorkerCoordination`` (stop agreement, ssp bound, parking, liveness); this class
adds what only training knows: where to clip, the statistics of a step, and what
goes into a checkpoint. With ``ps.hierarchy = "node"`` a ``NodeGroup`` sits in
between: the node's leader pulls and pushes for its node's workers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from hpcps.optim.clip import clip_coefficient
from hpcps.ps.client import PSClient
from hpcps.ps.coordination import WorkerCoordination
from hpcps.ps.node import NodeGroup
from hpcps.ps.shards import ShardSet
from hpcps.train.sync import GradReady, ignore_grad_ready


class PSSync:
    """A worker of a parameter-server job (see the module docstring)."""

    def __init__(self, *, cfg, shards: ShardSet, params: np.ndarray, checkpointer=None,
                 worker_state: Optional[dict] = None, node: Optional[NodeGroup] = None):
        roles = shards.roles
        self.cfg, self.checkpointer, self.node = cfg, checkpointer, node
        self.mode = roles.mode
        self.is_lead = roles.world_rank == roles.lead_worker
        self.coordination = WorkerCoordination(cfg, shards)
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

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        def save(agreed: dict, comm) -> None:
            if self.checkpointer is not None:
                self.checkpointer.save(step, shard=None, worker=worker_state, reason=agreed,
                                       comm=comm)
        return self.coordination.park_and_meet(step, reason, save)

    def pull(self, step: int) -> None:
        if self.client is not None:
            self.client.wait(self.client.pull(step))
        if self.node is not None:   # the leader publishes what it pulled; the others wait
            if self.node.is_leader:
                self.node.params_published(step)
            else:
                self.node.wait_for_params(step, self.coordination.duties)

    def start_push(self, grads, touched) -> GradReady:
        if self.node is not None:
            return ignore_grad_ready   # the node's sum is pushed after every backward ended
        return self.client.start_push(grads, touched)

    def push(self, step: int, grads, weight: float, loss: float, items: int) -> dict:
        if self.node is None:
            stats = self._to_servers(step, grads, weight, loss, items)
        else:
            self.node.hand_in(step, grads, weight, loss, items)
            if self.node.is_leader:
                node_grads, weight, loss, items = self.node.node_gradient(
                    step, self.coordination.duties)
                self.client.start_push(node_grads, None)
                stats = self._to_servers(step, node_grads, weight, loss, items)
                self.node.pushed(step)
            else:
                self.node.wait_until_pushed(step, self.coordination.duties)
                stats = {"loss": loss, "grad_norm": None}
        self.coordination.pushed(step)
        if self.is_lead:
            if self.mode == "bsp":  # the aggregate's loss and norm, published by the coordinator
                stats.update(self.coordination.step_stats(step))
            stats.update(self.coordination.staleness())
            stats["items_applied"] = self.coordination.items_applied()
        return stats

    def _to_servers(self, step: int, grads, weight: float, loss: float, items: int) -> dict:
        norm, scale = None, 1.0
        if self.mode != "bsp":  # no global aggregate to clip: clip this pusher's gradient
            norm, scale = clip_coefficient(float(grads @ grads), self.cfg.train.grad_clip)
        self.client.wait(self.client.push(step, weight=weight, loss=loss, scale=scale,
                                          items=items))
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
