"""MPI start-up, error agreement and abort: the rules that keep a job from hanging.

- Errors every rank can see the same way (config, corpus, resume checks) are
  agreed with ``agree_on_errors``: every rank learns of every problem, rank 0
  prints one line, every rank exits 2.
- An error on one rank only, once ranks depend on each other, ends the job with
  ``abort`` (MPI_Abort): never a hang.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from typing import Callable, Optional, TypeVar

from hpcps.errors import EXIT_FAILURE, EXIT_USAGE, UserError

T = TypeVar("T")


def mpi():
    """Import and initialise MPI (funneled: only the main thread calls MPI)."""
    import mpi4py
    mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI
    return MPI


def world():
    return mpi().COMM_WORLD


def say(message: str, *, rank: Optional[int] = None, stream=None) -> None:
    """One line to stderr, prefixed with the rank when printed from a rank other than 0."""
    stream = stream or sys.stderr
    prefix = f"[rank {rank}] " if rank else ""
    print(f"{prefix}{message}", file=stream, flush=True)


ABORT_GRACE_S = 0.5  # the launcher forwards our last line before MPI_Abort tears the job down


def abort(comm, code: int, message: str, reported_elsewhere: bool = False) -> None:
    """Print ``message`` from this rank and end the whole job with ``code``.

    MPI_Abort makes the launcher kill every rank at once, and output still in flight
    to it is lost with them (seen with MPICH's hydra about once in five aborts: the
    job ended with the right code and no line saying why). The short grace lets the
    line through first; the job is ending anyway. ``reported_elsewhere``: every rank
    has the same error and rank 0 prints it: this rank stays silent and waits longer,
    so that rank 0's abort, with its line, comes first."""
    if reported_elsewhere:
        time.sleep(2 * ABORT_GRACE_S)
    else:
        say(f"hpcps: error: {message}", rank=None)
        sys.stderr.flush()
        sys.stdout.flush()
        time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def agree_on_errors(comm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raised ``UserError`` anywhere, raise on all ranks.

    The raised error carries ``printed_by_rank0``-friendly text: the first failing
    rank's message, prefixed with that rank when it is not rank 0. Unexpected
    exceptions are treated as errors of that rank too (with the exception type).
    """
    result: Optional[T] = None
    problem: Optional[str] = None
    try:
        result = fn()
    except UserError as err:
        problem = str(err)
    except Exception as err:  # a bug on one rank must not leave the others waiting
        problem = f"internal error: {type(err).__name__}: {err}"
        traceback.print_exc()
    problems = comm.allgather(problem)
    for rank, text in enumerate(problems):
        if text is not None:
            internal = text.startswith("internal error")
            where = f" (on rank {rank})" if (rank and problems[0] is None) or internal else ""
            err = UserError(f"{text}{where}")
            err.exit_code = EXIT_FAILURE if internal else EXIT_USAGE
            err.agreed_rank = comm.Get_rank()  # every rank has it: only rank 0 prints
            raise err
    return result  # type: ignore[return-value]


def host_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def library_info() -> dict:
    """MPI library, version, thread level and CUDA-awareness (best effort)."""
    MPI = mpi()
    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    lib = MPI.Get_library_version().strip().splitlines()[0]
    return {"library": lib, "mpi_version": "%d.%d" % MPI.Get_version(),
            "thread_level": levels.get(MPI.Query_thread(), "?"),
            "cuda_aware": cuda_aware_mpi()}


def cuda_aware_mpi() -> str:
    """'yes', 'no' or 'unknown': MPIX query where the library offers one."""
    MPI = mpi()
    lib = MPI.Get_library_version()
    if "Open MPI" in lib:
        try:
            import ctypes
            handle = ctypes.CDLL(None)
            query = handle.MPIX_Query_cuda_support
            return "yes" if query() == 1 else "no"
        except (AttributeError, OSError):
            return "unknown"
    if "MPICH" in lib:
        value = os.environ.get("MPIR_CVAR_ENABLE_GPU", "")
        try:
            import ctypes
            handle = ctypes.CDLL(None)
            query = handle.MPIX_GPU_query_support
            kind = ctypes.c_int(0)
            out = ctypes.c_int(0)
            query(kind, ctypes.byref(out))  # MPIX_GPU_SUPPORT_CUDA == 0
            return "yes" if out.value and value != "0" else "no"
        except (AttributeError, OSError):
            return "unknown"
    return "unknown"
