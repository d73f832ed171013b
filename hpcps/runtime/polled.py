"""Collectives that keep a rank's watch duties running while they wait.

A blocking ``MPI_Barrier`` or ``bcast`` waits forever for a rank that was stopped
(SIGSTOP, a hung node) after the others entered it; nothing watches heartbeats
meanwhile. ``PolledComm`` offers the few collectives the sync points need
(``Barrier``, ``bcast``, ``gather`` of small picklable objects) built from
non-blocking MPI calls, polled with back-off; between polls it runs ``duties``
(heartbeats, and the coordinator's dead-rank watch, which aborts the job naming
the rank). Its methods have the signatures of ``mpi4py``'s, so code written for a
communicator (the checkpointer) takes either.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from hpcps.runtime.mpi import mpi
from hpcps.runtime.wait import Backoff

TAG_BCAST = 7301
TAG_GATHER = 7302


class PolledComm:
    def __init__(self, comm, duties: Optional[Callable[[], None]] = None):
        self.comm = comm
        self.duties = duties
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.size

    def _poll(self, done: Callable[[], bool]) -> None:
        backoff = Backoff(progress=self._progress)
        while not done():
            if self.duties is not None:
                self.duties()
            backoff.pause()

    def _progress(self) -> None:
        self.comm.Iprobe(mpi().ANY_SOURCE, mpi().ANY_TAG)

    def wait_for(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` (e.g. a thread doing file work) while running the duties and
        keeping MPI progress going, as the collectives here do."""
        self._poll(done)

    def _wait_all(self, requests) -> None:
        self._poll(lambda: mpi().Request.Testall(requests))

    def _recv(self, source: int, tag: int) -> Any:
        self._poll(lambda: self.comm.Iprobe(source=source, tag=tag))
        return self.comm.recv(source=source, tag=tag)

    def Barrier(self) -> None:  # noqa: N802
        request = self.comm.Ibarrier()
        self._poll(request.Test)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.rank == root:
            self._wait_all([self.comm.isend(obj, dest=r, tag=TAG_BCAST)
                            for r in range(self.size) if r != root])
            return obj
        return self._recv(root, TAG_BCAST)

    def gather(self, obj: Any, root: int = 0) -> Optional[list]:
        if self.rank != root:
            self._wait_all([self.comm.isend(obj, dest=root, tag=TAG_GATHER)])
            return None
        # non-overtaking: messages from one source arrive in the order they were sent
        return [obj if r == root else self._recv(r, TAG_GATHER) for r in range(self.size)]
