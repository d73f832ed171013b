"""The parameter-server strategy (bsp, ssp, asp): a ``StepSync`` over ``hpcps.ps``.

The data path is ``PSClient`` (pull and push handles), the control protocol is
``WorkerCoordination`` (stop agreement, ssp bound, parking, liveness); this class
adds what only training knows: where to clip, the statistics of a step, and what
goes into a checkpoint.
"""

from __future__ import annotations

import numpy as np

from hpcps.optim.clip import clip_coefficient
from hpcps.ps.client import PSClient
from hpcps.ps.coordination import WorkerCoordination
from hpcps.ps.shards import ShardSet
from hpcps.train.sync import GradReady


class PSSync:
    """A worker of a parameter-server job (see the module docstring)."""

    def __init__(self, *, cfg, shards: ShardSet, params: np.ndarray, checkpointer=None,
                 worker_state: dict | None = None):
        roles = shards.roles
        self.cfg, self.checkpointer = cfg, checkpointer
        self.mode = roles.mode
        self.is_lead = roles.world_rank == roles.lead_worker
        self.coordination = WorkerCoordination(cfg, shards)
        self.client = PSClient(cfg=cfg, shards=shards, params=params,
                               duties=self.coordination.duties)
        if worker_state:
            self.client.load_residual(worker_state.get("residual"))

    def should_stop(self, step: int) -> bool:
        return self.coordination.should_stop(step)

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        def save(agreed: dict, comm) -> None:
            if self.checkpointer is not None:
                self.checkpointer.save(step, shard=None, worker=worker_state, reason=agreed,
                                       comm=comm)
        return self.coordination.park_and_meet(step, reason, save)

    def pull(self, step: int) -> None:
        self.client.wait(self.client.pull(step))

    def start_push(self, grads, touched) -> GradReady:
        return self.client.start_push(grads, touched)

    def push(self, step: int, grads, weight: float, loss: float) -> dict:
        norm, scale = None, 1.0
        if self.mode != "bsp":  # no global aggregate to clip: clip this worker's gradient
            norm, scale = clip_coefficient(float(grads @ grads), self.cfg.train.grad_clip)
        self.client.wait(self.client.push(step, weight=weight, loss=loss, scale=scale))
        self.coordination.pushed(step)
        stats = {"loss": loss, "grad_norm": norm}
        if self.is_lead:
            if self.mode == "bsp":  # the aggregate's loss and norm, published by the coordinator
                stats.update(self.coordination.step_stats(step))
            stats.update(self.coordination.staleness())
            stats["pushes_applied"] = self.coordination.pushes_applied()
        return stats

    def traffic(self) -> dict:
        return self.client.take_traffic()

    def worker_state(self) -> dict:
        residual = self.client.residual()
        return {} if residual is None else {"residual": residual}

    def close(self) -> None:
        self.coordination.close()
