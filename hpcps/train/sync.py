"""How a worker's gradient becomes an update: the strategies the trainer runs on.

Every strategy offers the same calls to the training loop:
``decide(step)`` (stop requested?), ``sync_point(step, reason)`` (collective:
checkpoint / stop / end), ``pull(step)``, ``push(step, grads, weight, loss)``
-> step stats, and ``traffic()``.

- ``LocalSync``: one process, optimizer on the whole buffer.
- ``AllreduceSync``: synchronous data parallel, ``MPI_Allreduce`` of the
  weighted gradient, every rank runs the same optimizer (Horovod-style baseline).
- ``hpcps.ps.worker_sync.PSSync``: push/pull through the server shards.
"""

from __future__ import annotations

import numpy as np

from hpcps.gpu import to_host
from hpcps.optim import make_optimizer
from hpcps.optim.clip import clip_coefficient
from hpcps.runtime import signals


class LocalSync:
    stats_every_step = True

    def __init__(self, cfg, layout, lr_fn, params, checkpointer=None, backend=None):
        xp = backend.xp if backend is not None else np
        self.cfg, self.layout, self.lr_fn = cfg, layout, lr_fn
        self.params = params
        self.opt = make_optimizer(cfg, layout.total, layout.decay_ranges(), xp=xp)
        self.checkpointer = checkpointer
        self.is_lead = True

    def decide(self, step: int) -> bool:
        return signals.stop_requested()

    def pull(self, step: int) -> None:
        pass

    def begin_backward(self, grads, touched) -> None:
        pass

    def grad_ready(self, lo: int, hi: int) -> None:
        pass

    def _apply(self, step: int, grads) -> float:
        sumsq = float(grads @ grads)
        norm, scale = clip_coefficient(sumsq, self.cfg.train.grad_clip)
        self.opt.step(self.params, grads, self.lr_fn(step), scale)
        return norm

    def push(self, step: int, grads, weight: float, loss: float) -> dict:
        return {"loss": loss, "grad_norm": self._apply(step, grads)}

    def shard_state(self) -> dict:
        # checkpoints are written from host memory: device state is copied out here
        state = {k: to_host(v) for k, v in self.opt.state().items()}
        state["params"] = to_host(self.params)
        return state

    def sync_point(self, step: int, reason: dict, worker_state: dict) -> None:
        if reason.get("checkpoint") and self.checkpointer is not None:
            self.checkpointer.save(step, shard=(0, self.layout.total, self.shard_state()),
                                   worker=worker_state, reason=reason)

    def traffic(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class AllreduceSync(LocalSync):
    """Allreduce of [weight * grad, weight, weight * loss, stop flag] in one call."""

    def __init__(self, cfg, layout, lr_fn, params, roles, checkpointer=None, backend=None):
        super().__init__(cfg, layout, lr_fn, params, checkpointer, backend)
        self.roles = roles
        self.comm = roles.comm
        self.is_lead = roles.world_rank == roles.lead_worker
        self.device = None   # GPU: the payload lives on the device or in pinned host memory
        if backend is not None and backend.is_gpu:
            from hpcps.gpu.transport import AllreduceBuffer
            from hpcps.runtime.mpi import cuda_aware_mpi
            self.device = AllreduceBuffer(layout.total, cuda_aware_mpi())
            self.buf = self.device.buf
        else:
            self.buf = np.empty(layout.total + 3, dtype=np.float32)
        self.stop_seen = False
        self.bytes = 0

    def decide(self, step: int) -> bool:
        return self.stop_seen

    def begin_backward(self, grads, touched) -> None:
        if self.device is not None:
            self.device.begin(grads)

    def grad_ready(self, lo: int, hi: int) -> None:
        if self.device is not None:   # staged: copy this range to the host while backward runs
            self.device.grad_ready(lo, hi)

    def push(self, step, grads, weight, loss):
        if self.device is not None:
            return self._push_device(step, grads, weight, loss)
        from hpcps.runtime.mpi import mpi
        n = self.layout.total
        buf = self.buf
        np.multiply(grads, np.float32(weight), out=buf[:n])
        buf[n] = weight
        buf[n + 1] = weight * loss
        buf[n + 2] = 1.0 if signals.stop_requested() else 0.0
        self.comm.Allreduce(mpi().IN_PLACE, buf, op=mpi().SUM)
        self.bytes += 2 * buf.nbytes
        total = float(buf[n])
        grads[...] = buf[:n]
        grads *= np.float32(1.0 / total)
        self.stop_seen = buf[n + 2] > 0
        return {"loss": float(buf[n + 1]) / total, "grad_norm": self._apply(step, grads)}

    def _push_device(self, step, grads, weight, loss):
        """push() for device gradients: the same sums, through AllreduceBuffer."""
        from hpcps.runtime.mpi import mpi
        dev = self.device
        dev.gather(grads, weight)
        dev.set_tail([weight, weight * loss, 1.0 if signals.stop_requested() else 0.0])
        self.comm.Allreduce(mpi().IN_PLACE, self.buf, op=mpi().SUM)
        self.bytes += 2 * self.buf.nbytes
        total, loss_sum, stop = (float(v) for v in dev.tail())
        dev.scatter(grads)
        grads *= np.float32(1.0 / total)
        self.stop_seen = stop > 0
        return {"loss": loss_sum / total, "grad_norm": self._apply(step, grads)}

    def sync_point(self, step, reason, worker_state):
        # every rank holds the same replica: rank 0 writes the one shard, all write worker state
        if reason.get("checkpoint") and self.checkpointer is not None:
            shard = (0, self.layout.total, self.shard_state()) if self.is_lead else None
            self.checkpointer.save(step, shard=shard, worker=worker_state, reason=reason)
        self.comm.Barrier()

    def traffic(self) -> dict:
        return {"allreduce_mb": self.bytes / 1e6}
