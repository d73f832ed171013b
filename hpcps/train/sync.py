"""How a worker's gradient becomes an update: the consistency strategies the trainer runs on.

``StepSync`` is the seam: what the training loop asks of a strategy at every step.
Three implementations:

- ``LocalSync``: one process, optimizer on the whole buffer.
- ``AllreduceSync``: synchronous data parallel, ``MPI_Allreduce`` of the
  weighted gradient, every rank runs the same optimizer (Horovod-style baseline).
- ``hpcps.train.ps_sync.PSSync``: push/pull through the parameter-server shards
  (bsp, ssp, asp).
- ``hpcps.train.local_sync.LocalStepsSync``: local steps on a replica, pseudo-gradient
  pushes every H steps through a ``PSSync`` (``ps.local_steps``).

(``hpcps.gpu.transport.DeviceSync`` wraps any of them for a model on the GPU.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import numpy as np

from hpcps.gpu import to_host
from hpcps.optim import make_optimizer
from hpcps.optim.clip import clip_coefficient
from hpcps.runtime import signals
from hpcps.runtime.mpi import mpi

GradReady = Callable[[int, int], None]
"""``on_grad_ready(lo, hi)``: backward reports that gradient range [lo, hi) is final."""


def ignore_grad_ready(lo: int, hi: int) -> None:
    """The ``GradReady`` of strategies that send nothing before backward ends."""


@dataclass
class Work:
    """One update a worker computes: items [lo, hi) of the global batch of ``step`` (which
    also sets the learning rate and the dropout keys)."""
    step: int
    lo: int
    hi: int


class StepSync(Protocol):
    """What the training loop asks of a consistency strategy, in the order it asks.

    At the top of step t: ``should_stop(t)`` (waits as the strategy's consistency rule
    says; True when all ranks stop at this boundary), then at a boundary that needs all
    ranks (checkpoint, stop, end) ``meet``, then ``pull(t)`` and ``assign(t)`` (this
    worker's slice of step t). After the forward pass: ``start_push`` before backward,
    ``push`` after it. ``traffic`` and ``worker_state`` feed the step record and the
    checkpoint.

    With ``samples_budget`` (asp/ssp, ``ps.budget = samples``) there are no common steps:
    the loop asks ``claim(limit)`` for the next batch of the global sample stream before the
    sync boundary ``limit``; None means this worker stands at ``boundary`` and meets there."""

    samples_budget: bool

    def should_stop(self, step: int) -> bool:
        """Wait until ``step`` may begin; True when every worker stops at this step."""

    def assign(self, step: int) -> Work:
        """The slice of the global batch of ``step`` this worker computes."""

    def claim(self, limit: int) -> Optional[Work]:
        """Sample budget: the next batch before boundary ``limit``, or None when the batches
        before it (or before an agreed stop) are all handed out; ``boundary`` then says
        where this worker stands: (step, stop agreed there)."""

    def applied_through(self, step: int) -> tuple[int, float, float]:
        """Sample budget, lead worker: (items, sum of weight * loss, sum of weight) the
        servers applied job-wide, once every batch before sync point ``step`` is in."""

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        """Collective sync point at ``step`` (checkpoint when ``reason`` says so); returns
        the reason every rank follows (the lead worker's)."""

    def before_meet(self, step: int) -> dict:
        """A sync point at ``step`` begins (before any wait for the others or the
        checkpoint's worker state): complete what must not stay half done there (local
        steps push their open round); returns what the record of ``step`` adds."""

    def params_to_evaluate(self, params):
        """The params an evaluation at this boundary reads: the model's ``params``, or
        with local steps the global params of the current round."""

    def pull(self, step: int) -> None:
        """Make the params of ``step`` (after ``step`` updates) the ones the model reads."""

    def start_push(self, grads, touched: dict) -> GradReady:
        """Before backward: returns the callback backward reports finished ranges to."""

    def push(self, step: int, grads, weight: float, loss: float, items: int,
             compute_s: float = 0.0) -> dict:
        """Hand in the gradient of ``step``: the mean over ``weight`` (tokens, pairs) of this
        worker's ``items`` sequences, computed in ``compute_s`` seconds; returns the step's
        statistics: ``loss``, ``grad_norm`` and, where known, staleness counts and the items
        applied job-wide."""

    def traffic(self) -> dict:
        """Bytes moved since the last call, as MB, for the step record."""

    def worker_state(self) -> dict:
        """Arrays this worker adds to a checkpoint (e.g. error-feedback residuals)."""

    def close(self) -> None:
        """The run is over (flush logs, free buffers)."""


class LocalSync:
    """One process: the optimizer steps the whole buffer after every backward."""

    def __init__(self, cfg, layout, lr_fn, params, checkpointer=None, backend=None,
                 opt_state: Optional[dict] = None):
        xp = backend.xp if backend is not None else np
        self.cfg, self.layout, self.lr_fn = cfg, layout, lr_fn
        self.params = params
        self.opt = make_optimizer(cfg, layout.total, layout.decay_ranges(), xp=xp)
        if opt_state is not None:
            self.opt.load_state(opt_state)
        self.checkpointer = checkpointer
        self.is_lead = True
        self.samples_budget = False
        self.slice = (0, cfg.train.batch_size)   # this rank's items of every global batch

    def should_stop(self, step: int) -> bool:
        return signals.stop_requested()

    def assign(self, step: int) -> Work:
        return Work(step, *self.slice)

    def claim(self, limit: int) -> Optional[Work]:
        raise NotImplementedError("only a sample-budget strategy hands out batches")

    def before_meet(self, step: int) -> dict:
        return {}

    def params_to_evaluate(self, params):
        return params

    def pull(self, step: int) -> None:
        pass  # the params are updated in place by push

    def start_push(self, grads, touched) -> GradReady:
        return ignore_grad_ready

    def _apply(self, step: int, grads) -> float:
        sumsq = float(grads @ grads)
        norm, scale = clip_coefficient(sumsq, self.cfg.train.grad_clip)
        self.opt.step(self.params, grads, self.lr_fn(step), scale)
        return norm

    def push(self, step: int, grads, weight: float, loss: float, items: int,
             compute_s: float = 0.0) -> dict:
        return {"loss": loss, "grad_norm": self._apply(step, grads)}

    def shard_state(self) -> dict:
        # checkpoints are written from host memory: device state is copied out here
        state = {k: to_host(v) for k, v in self.opt.state().items()}
        state["params"] = to_host(self.params)
        return state

    def meet(self, step: int, reason: dict, worker_state: dict) -> dict:
        if reason.get("checkpoint") and self.checkpointer is not None:
            self.checkpointer.save(step, shard=(0, self.layout.total, self.shard_state()),
                                   worker=worker_state, reason=reason)
        return reason

    def traffic(self) -> dict:
        return {}

    def worker_state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class AllreduceSync(LocalSync):
    """Allreduce of [weight * grad, weight, weight * loss, stop flag] in one call."""

    def __init__(self, cfg, layout, lr_fn, params, roles, checkpointer=None, backend=None,
                 opt_state: Optional[dict] = None, device_buffer=None):
        super().__init__(cfg, layout, lr_fn, params, checkpointer, backend, opt_state)
        self.comm = roles.comm
        self.is_lead = roles.world_rank == roles.lead_worker
        b = cfg.train.batch_size
        self.slice = (roles.worker_index * b, (roles.worker_index + 1) * b)
        # GPU: the payload lives on the device or in pinned host memory (AllreduceBuffer)
        self.device = device_buffer
        self.buf = (device_buffer.buf if device_buffer is not None
                    else np.empty(layout.total + 3, dtype=np.float32))
        self.stop_seen = False
        self.bytes = 0

    def should_stop(self, step: int) -> bool:
        return self.stop_seen  # every rank learned it from the same allreduce

    def start_push(self, grads, touched) -> GradReady:
        if self.device is None:
            return ignore_grad_ready
        self.device.begin(grads)
        return self.device.grad_ready  # staged: copy each range to the host while backward runs

    def push(self, step, grads, weight, loss, items, compute_s=0.0):
        tail = [weight, weight * loss, 1.0 if signals.stop_requested() else 0.0]
        n = self.layout.total
        if self.device is not None:
            self.device.gather(grads, weight)
            self.device.set_tail(tail)
        else:
            np.multiply(grads, np.float32(weight), out=self.buf[:n])
            self.buf[n:] = tail
        self.comm.Allreduce(mpi().IN_PLACE, self.buf, op=mpi().SUM)
        self.bytes += 2 * self.buf.nbytes
        if self.device is not None:
            total, loss_sum, stop = (float(v) for v in self.device.tail())
            self.device.scatter(grads)
        else:
            total, loss_sum, stop = (float(v) for v in self.buf[n:])
            grads[...] = self.buf[:n]
        grads *= np.float32(1.0 / total)
        self.stop_seen = stop > 0
        return {"loss": loss_sum / total, "grad_norm": self._apply(step, grads)}

    def meet(self, step, reason, worker_state):
        # every rank holds the same replica: the lead writes the one shard, all write worker state
        if reason.get("checkpoint") and self.checkpointer is not None:
            shard = (0, self.layout.total, self.shard_state()) if self.is_lead else None
            self.checkpointer.save(step, shard=shard, worker=worker_state, reason=reason)
        self.comm.Barrier()
        return reason

    def traffic(self) -> dict:
        return {"allreduce_mb": self.bytes / 1e6}
