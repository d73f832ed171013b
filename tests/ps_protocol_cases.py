"""Unit cases of the parameter-server protocol, run by every rank of one ``mpirun``
(mpi4py's test style): ``mpirun -n N python tests/ps_protocol_cases.py CASE``.

The last rank owns the windows (a server); the others are workers driving the real
``PSClient`` against them. Every rank checks exact values and prints ``OK <case>``
or ``FAIL <case>: <why>``; ``tests/test_ps_protocol.py`` launches the cases with
several rank counts under each MPI.

- ``gate``: the owner rewrites its shard (value = version, written in slow chunks
  with the gate closed) while workers pull: every pull sees one version everywhere
  and the version it read inside the gate, and versions never go back.
- ``gate_bypassed`` (negative control): the same reads without the gate must see a
  torn shard at least once, so ``gate`` could fail.
- ``slots``: every worker pushes K steps whose payload is ``1000 w + step`` (fp32,
  through ``PSClient.push``/``wait``); the owner consumes slot flags: every push
  arrives whole, in order, exactly once (W K pushes in all).
- ``slots_early_read`` (negative control): reading a slot before its flag is set
  finds no push, so the ``slots`` check could fail.
- ``target_progress``: how long an atomic takes to a target that sleeps in Python for
  1 s (prints ``ATOMIC <seconds>``): about 1 s where the path needs the target's MPI
  progress (the network module), microseconds through shared memory. The tests use it
  to show which path a launch really takes.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from hpcps.config.load import load_config
from hpcps.model.layout import ParamLayout
from hpcps.ps import control as C
from hpcps.ps.client import PSClient
from hpcps.ps.roles import Roles
from hpcps.ps.shards import ShardSet
from hpcps.ps.windows import G_PARAMS, SLOT_HEADER, Header
from hpcps.runtime.mpi import mpi

N = 4099                 # shard elements (odd: no accidental alignment)
VERSIONS = 40            # gate: owner updates
CHUNKS = 8               # gate: an update is written in this many slow pieces
STEPS = 25               # slots: pushes per worker


def no_duties() -> None:
    """These cases have no heartbeats or watches to keep."""


def open_shards(comm, mode: str = "asp") -> ShardSet:
    rank, size = comm.Get_rank(), comm.Get_size()
    roles = Roles(mode, rank, size, [size - 1], list(range(size - 1)), [0] * size, rank, size,
                  comm=comm, hosts=[""] * size)
    cfg = load_config(None, [f"ps.mode={mode}", "ps.overlap=false", "ps.compression=none"])
    layout = ParamLayout()
    layout.add("w", (N,))
    return ShardSet.open(cfg, roles, layout), cfg


# -- the params gate ---------------------------------------------------------------------
def owner_updates(shards: ShardSet) -> None:
    wins, me = shards.wins, shards.roles.world_rank
    bounds = np.linspace(0, N, CHUNKS + 1).astype(int)
    for version in range(1, VERSIONS + 1):
        wins.begin_write()
        for a, b in zip(bounds[:-1], bounds[1:]):
            wins.local_params[a:b] = version
            time.sleep(2e-4)  # a reader without the gate would land in the middle
            wins.progress()   # as a server does: others' atomics need us inside MPI
        wins.write(me, C.VERSION, version)
        wins.end_write()
        for _ in range(5):    # readers get their turn between updates
            time.sleep(2e-4)
            wins.progress()


def check_pull(params: np.ndarray, version_read: int, last: int) -> str:
    """'' when the pull is one whole version, the one read inside the gate, not older."""
    values = np.unique(params)
    if len(values) != 1:
        return f"torn shard: versions {values.tolist()[:6]}"
    if int(values[0]) != version_read:
        return f"shard holds version {int(values[0])} but VERSION read {version_read}"
    if version_read < last:
        return f"version went back from {last} to {version_read}"
    return ""


def case_gate(comm, bypass: bool = False) -> str:
    shards, cfg = open_shards(comm)
    roles, wins = shards.roles, shards.wins
    problem, torn = "", 0
    if roles.is_server:
        wins.local_params[:] = 0
        wins.params.Sync()
    comm.Barrier()
    if roles.is_server:
        owner_updates(shards)
        comm.Ibarrier().Wait()  # matches the workers' Ibarrier: the updates are over
    else:
        params = np.zeros(N, dtype=np.float32)
        client = PSClient(cfg=cfg, shards=shards, params=params, duties=no_duties)
        server, last, pulls = roles.servers[0], 0, 0
        done = comm.Ibarrier()
        while not done.Test():
            if bypass:  # no gate: a plain Get while the owner may be writing
                wins.params.Get([params, mpi().FLOAT], server, (G_PARAMS, N, mpi().FLOAT))
                wins.params.Flush(server)
                why = "torn" if len(np.unique(params)) > 1 else ""
            else:
                client.wait(client.pull(0))
                why = check_pull(params, client.pulled_version[0], last)
                last = client.pulled_version[0]
            pulls += 1
            torn += bool(why)
            problem = problem or why
        client.wait(client.pull(0))   # after the last update: exactly the final version
        final = check_pull(params, client.pulled_version[0], last)
        problem = problem or final
        if client.pulled_version[0] != VERSIONS:
            problem = problem or f"final version {client.pulled_version[0]} != {VERSIONS}"
        if pulls < 10:
            problem = problem or f"only {pulls} pulls overlapped the updates"
    shards.close()
    if bypass and roles.is_worker:  # the control: without the gate, reads do tear
        return "" if torn > 0 else "no torn read without the gate: the gate check proves nothing"
    return problem


# -- the push slots ----------------------------------------------------------------------
def slot_payload(wins, w: int) -> tuple[int, int, np.ndarray]:
    """(step, nbytes, fp32 payload) of worker w's slot, as the owner sees it."""
    wins.slots.Sync()
    slot = wins.local_slot(w)
    head = slot[:SLOT_HEADER].view(np.int64)
    nbytes = int(head[Header.NBYTES])
    return int(head[Header.STEP]), nbytes, slot[SLOT_HEADER:SLOT_HEADER + nbytes].view(np.float32)


def check_push(w: int, expect_step: int, step: int, nbytes: int, payload: np.ndarray) -> str:
    if step != expect_step:
        return f"worker {w}: got step {step}, expected {expect_step}"
    if nbytes != 4 * N:
        return f"worker {w} step {step}: {nbytes} payload bytes, expected {4 * N}"
    if not np.array_equal(payload, np.full(N, 1000 * w + step, dtype=np.float32)):
        return f"worker {w} step {step}: payload differs from {1000 * w + step}"
    return ""


def case_slots(comm, early_read: bool = False) -> str:
    shards, cfg = open_shards(comm)
    roles, wins = shards.roles, shards.wins
    W, me, problem = roles.n_workers, roles.world_rank, ""
    comm.Barrier()
    if roles.is_server:
        L = wins.ctl_layout
        if early_read:  # before any push: the check must refuse what is in the slot
            result = "" if check_push(0, 0, *slot_payload(wins, 0)) else "early read accepted"
            comm.Barrier()
            shards.close()
            return result
        expected, applied = [0] * W, 0
        while applied < W * STEPS and not problem:
            states = wins.read_block(me, L.slot_state, L.slot_state + W)
            for w in np.nonzero(states == 1)[0]:
                w = int(w)
                problem = check_push(w, expected[w], *slot_payload(wins, w))
                expected[w] += 1
                applied += 1
                wins.write(me, L.slot_state + w, 0)  # consumed: the worker may refill it
        if wins.read(me, L.slot_state) not in (0, 1):
            problem = problem or "slot flag holds neither 0 nor 1"
        problem = problem or ("" if applied == W * STEPS else f"{applied} pushes, not {W * STEPS}")
    elif not early_read:
        w = roles.worker_index
        client = PSClient(cfg=cfg, shards=shards, params=np.zeros(N, np.float32), duties=no_duties)
        grads = np.empty(N, dtype=np.float32)
        for step in range(STEPS):
            grads[:] = 1000 * w + step
            client.start_push(grads, None)
            client.wait(client.push(step, weight=1.0, loss=0.0, scale=1.0, items=1))
    if early_read:
        comm.Barrier()
    shards.close()
    return problem


def case_target_progress(comm) -> str:
    win = mpi().Win.Allocate(8 if comm.Get_rank() == 0 else 0, 8, comm=comm)
    win.Lock_all()
    comm.Barrier()
    if comm.Get_rank() == 0:
        time.sleep(1.0)   # no MPI call: only shared memory completes an atomic meanwhile
    elif comm.Get_rank() == 1:
        time.sleep(0.1)   # the target is surely asleep
        one, old = np.ones(1, np.int64), np.zeros(1, np.int64)
        started = time.perf_counter()
        win.Fetch_and_op(one, old, 0, 0, mpi().SUM)
        win.Flush(0)
        print(f"ATOMIC {time.perf_counter() - started:.6f}", flush=True)
    comm.Barrier()
    win.Unlock_all()
    win.Free()
    return ""


CASES = {
    "target_progress": case_target_progress,
    "gate": lambda comm: case_gate(comm),
    "gate_bypassed": lambda comm: case_gate(comm, bypass=True),
    "slots": lambda comm: case_slots(comm),
    "slots_early_read": lambda comm: case_slots(comm, early_read=True),
}


if __name__ == "__main__":
    name = sys.argv[1]
    world = mpi().COMM_WORLD
    why = CASES[name](world)
    print(f"FAIL {name} rank {world.Get_rank()}: {why}" if why else f"OK {name}", flush=True)
