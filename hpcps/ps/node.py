"""Node-local aggregation (``ps.hierarchy = "node"``): the workers of a node share one
push and one pull through a shared-memory window.

Each node's workers allocate one ``MPI_Win_allocate_shared`` window on a
communicator of the node's workers (``COMM_TYPE_SHARED``). It holds

- ``params`` [P]: the params the node's leader pulled; every local worker's model
  reads them in place (one pull per node instead of one per worker);
- ``grads`` [L x P]: worker i's gradient times its weight (tokens);
- control words: the step whose params are published, the step the leader pushed,
  and per worker the step its gradient belongs to, its weight, loss and items.

A step on a node is synchronous: the leader pulls step t into ``params`` while
every local worker waits, all compute, each writes its weighted gradient and
publishes its step, the leader sums them and pushes the node's weighted mean as one
push of the summed weight (so the server's weighted mean over nodes is the mean
over all workers: bsp stays equal to one process), then publishes that it pushed.
A worker writes its next gradient only after that, and the leader pulls step t+1
only after every local gradient of step t was summed, so nobody reads a buffer
while it is written.

Every word has one writer; a writer stores its data, calls ``Win_sync`` (the
memory barrier of MPI's shared-memory model), then stores the word; a reader
syncs, reads the word, syncs, reads the data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hpcps.ps.control import f2i, i2f
from hpcps.ps.roles import Roles
from hpcps.runtime.mpi import mpi
from hpcps.runtime.wait import wait_until

# control words: [PARAMS_STEP, PUSHED, then per local worker: STEP, WEIGHT, LOSS, ITEMS]
PARAMS_STEP, PUSHED, HEAD = 0, 1, 2
PER_WORKER = 4


class NodeGroup:
    """This worker's node (see the module docstring). Collective over every worker to
    create and to ``close``; each wait runs the caller's ``duties`` (heartbeats)."""

    def __init__(self, roles: Roles, n_params: int):
        MPI = mpi()
        self.roles, self.P = roles, n_params
        self.comm = roles.worker_comm.Split_type(MPI.COMM_TYPE_SHARED, key=roles.world_rank)
        self.local = self.comm.Get_rank()
        self.L = self.comm.Get_size()
        self.is_leader = self.local == 0
        n_ctl = HEAD + PER_WORKER * self.L
        # the leader holds the memory; the others map it (one contiguous segment)
        size = (n_params * (1 + self.L) * 4 + n_ctl * 8) if self.is_leader else 0
        self.win = MPI.Win.Allocate_shared(size, 1, comm=self.comm)
        buf, _ = self.win.Shared_query(0)
        raw = np.frombuffer(buf, dtype=np.uint8)
        self.params = raw[:n_params * 4].view(np.float32)
        self.grads = raw[n_params * 4:n_params * (1 + self.L) * 4].view(np.float32)
        self.grads = self.grads.reshape(self.L, n_params)
        self.ctl = raw[n_params * (1 + self.L) * 4:].view(np.int64)
        if self.is_leader:
            self.ctl[:] = 0
        self.win.Lock_all()
        self.comm.Barrier()  # the control words are zero before anyone reads them
        self.sum = np.empty(n_params, dtype=np.float32) if self.is_leader else None

    # -- one writer per word: data, barrier, word ------------------------------------
    def _publish(self, index: int, value: int) -> None:
        self.win.Sync()
        self.ctl[index] = value
        self.win.Sync()

    def _read(self, index: int) -> int:
        self.win.Sync()
        return int(self.ctl[index])

    def _wait(self, condition: Callable[[], bool], duties: Callable[[], None]) -> None:
        wait_until(condition, duties)
        self.win.Sync()  # what was written before the word is visible now

    # -- pull ------------------------------------------------------------------------
    def params_published(self, step: int) -> None:
        """Leader: ``params`` now hold the params of ``step``."""
        self._publish(PARAMS_STEP, step + 1)

    def wait_for_params(self, step: int, duties: Callable[[], None]) -> None:
        self._wait(lambda: self._read(PARAMS_STEP) >= step + 1, duties)

    # -- push ------------------------------------------------------------------------
    def hand_in(self, step: int, grads: np.ndarray, weight: float, loss: float,
                items: int) -> None:
        """This worker's gradient of ``step``, as weight * grads, for the leader to sum."""
        np.multiply(grads, np.float32(weight), out=self.grads[self.local])
        base = HEAD + PER_WORKER * self.local
        self.ctl[base + 1] = f2i(weight)
        self.ctl[base + 2] = f2i(loss)
        self.ctl[base + 3] = items
        self._publish(base, step + 1)

    def node_gradient(self, step: int, duties: Callable[[], None]
                      ) -> tuple[np.ndarray, float, float, int]:
        """Leader: once every local worker handed in ``step``, (the weighted mean gradient,
        the summed weight, the weighted mean loss, the summed items)."""
        steps = [HEAD + PER_WORKER * i for i in range(self.L)]
        self._wait(lambda: all(self._read(b) >= step + 1 for b in steps), duties)
        weights = [i2f(int(self.ctl[b + 1])) for b in steps]
        losses = [i2f(int(self.ctl[b + 2])) for b in steps]
        items = sum(int(self.ctl[b + 3]) for b in steps)
        total = float(sum(weights))
        np.sum(self.grads, axis=0, out=self.sum)
        self.sum *= np.float32(1.0 / total)
        loss = sum(w * x for w, x in zip(weights, losses)) / total
        return self.sum, total, loss, items

    def pushed(self, step: int) -> None:
        """Leader: the node's push of ``step`` is at the servers (the buffers are free)."""
        self._publish(PUSHED, step + 1)

    def wait_until_pushed(self, step: int, duties: Callable[[], None]) -> None:
        self._wait(lambda: self._read(PUSHED) >= step + 1, duties)

    def close(self) -> None:
        """Collective over the node's workers."""
        self.comm.Barrier()
        self.win.Unlock_all()
        self.win.Free()
        self.comm.Free()
