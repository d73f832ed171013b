"""Which one-sided operations need the target rank to be inside MPI? (docs/protocol.md)

Rank 0 owns an allocated window and, for each operation in turn, sleeps 1 s in Python
(no MPI call); rank 1 starts the operation 0.1 s into that sleep and times it to
completion (the operation + ``Flush``). About 0.9 s means the operation waited for the
target's progress; microseconds mean it completed without the target.

    mpirun -n 2 python benchmarks/target_progress.py                      # MPICH, shared memory
    MPIR_CVAR_NOLOCAL=1 mpirun -n 2 python benchmarks/target_progress.py  # MPICH, network module
    mpirun --mca plm_rsh_agent tests/fake_node_rsh.sh --host a:1,b:1 --map-by node \\
        --mca btl self,tcp --mca osc rdma -n 2 python benchmarks/target_progress.py  # Open MPI, TCP
"""

import json
import sys
import time

import numpy as np
from mpi4py import MPI

SLEEP_S = 1.0
BYTES = 3_216_384                     # the nanoGPT CPU model's shard (804,096 fp32)


def operations(win, MPI):
    word, old = np.ones(1, np.int64), np.zeros(1, np.int64)
    block = np.zeros(8, np.int64)
    data = np.zeros(BYTES, np.uint8)
    return {
        "Fetch_and_op (gate, heartbeat)": lambda: win.Fetch_and_op(word, old, 0, 0, MPI.SUM),
        "Accumulate REPLACE (flag)": lambda: win.Accumulate([word, MPI.INT64_T], 0, (0, 1, MPI.INT64_T),
                                                            op=MPI.REPLACE),
        "Get_accumulate NO_OP (block read)": lambda: win.Get_accumulate(
            [block, MPI.INT64_T], [block, MPI.INT64_T], 0, (0, 8, MPI.INT64_T), op=MPI.NO_OP),
        "Get 3.2 MB (pull)": lambda: win.Get([data, MPI.BYTE], 0, (64, BYTES, MPI.BYTE)),
        "Put 3.2 MB (push)": lambda: win.Put([data, MPI.BYTE], 0, (64, BYTES, MPI.BYTE)),
    }


def main() -> int:
    comm = MPI.COMM_WORLD
    win = MPI.Win.Allocate(64 + BYTES if comm.rank == 0 else 0, 1, comm=comm)
    win.Lock_all()
    results = {}
    for name, op in operations(win, MPI).items():
        comm.Barrier()
        if comm.rank == 0:
            time.sleep(SLEEP_S)
        elif comm.rank == 1:
            time.sleep(0.1)
            started = time.perf_counter()
            op()
            win.Flush(0)
            results[name] = time.perf_counter() - started
    comm.Barrier()
    win.Unlock_all()
    win.Free()
    if comm.rank == 1:
        library = MPI.Get_library_version().splitlines()[0].strip()
        if "--json" in sys.argv:
            print(json.dumps({"library": library, "seconds": results}))
        else:
            print(library)
            for name, seconds in results.items():
                verdict = "waits for the target" if seconds > 0.5 * SLEEP_S else "completes alone"
                print(f"  {name:36s} {seconds * 1e6:12.0f} us  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
