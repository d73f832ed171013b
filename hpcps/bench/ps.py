"""``hpcps bench ps``: push / pull bandwidth through the parameter-server windows
against raw mpi4py RMA on windows allocated the same way, under ``mpirun``.

The last S ranks are servers, the others workers. For every message size (bytes
per server shard) and every repeat, these are timed side by side, per operation:

- ``push``: ``PSClient.push`` (Put payload + header, Flush, slot flag, clock),
  started once the slot is free again (the wait for the server to release the
  slot is not part of the transfer; ``push_cycle`` includes it).
- ``pull``: ``PSClient.pull`` + ``wait`` (gate, version, Rget, leave).
- ``raw_put`` / ``raw_get``: ``Put``/``Get`` + ``Flush`` inside one
  ``Lock(SHARED)`` epoch on a ``Win.Allocate`` window, each worker its own region.
- ``raw_acc``: ``Accumulate(SUM)`` + ``Flush`` of every worker into ONE shared
  buffer: the alternative to per-worker push slots.

Bandwidth is bytes / time summed over a worker's operations, averaged over
workers; ``aggregate`` numbers are all workers' bytes / the slowest worker's wall
time (what the server receives when all push at once). Medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from hpcps.config.load import load_config
from hpcps.errors import UserError
from hpcps.model.layout import ParamLayout
from hpcps.ps import control as C
from hpcps.ps.client import PSClient
from hpcps.ps.codec import ShardCodec
from hpcps.ps.roles import Roles
from hpcps.ps.shards import ShardSet
from hpcps.ps.windows import PSWindows
from hpcps.runtime.mpi import agree_on_errors, library_info, mpi
from hpcps.runtime.wait import Backoff

DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M"
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
VARIANTS = ("push", "raw_put", "pull", "raw_get", "raw_acc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"message sizes per server shard, e.g. 64K,1M (default {DEFAULT_SIZES})")
    parser.add_argument("--servers", type=int, default=1, help="server ranks (the last ones)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per size")
    parser.add_argument("--mib-per-repeat", type=float, default=128.0,
                        help="bytes each worker moves per variant and repeat, in MiB "
                             "(sets the operation count; at least 3 operations)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        unit = UNITS.get(part[-1].upper(), 1)
        number = part[:-1] if part[-1].upper() in UNITS else part
        try:
            value = int(float(number) * unit)
        except ValueError:
            raise UserError(f"--sizes: cannot read {part!r} (use e.g. 64K,1M,64M)") from None
        if value < 4 or value % 4:
            raise UserError(f"--sizes: {part} is not a positive multiple of 4 bytes")
        sizes.append(value)
    if not sizes:
        raise UserError("--sizes is empty")
    return sizes


def check_args(args, world_size: int) -> list[int]:
    if world_size < 2:
        raise UserError("the PS bandwidth benchmark needs at least 2 ranks: "
                        "mpirun -n 2 python -m mpi4py -m hpcps bench ps")
    if not 1 <= args.servers < world_size:
        raise UserError(f"--servers must be between 1 and {world_size - 1} for {world_size} "
                        f"ranks, got {args.servers}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    if args.mib_per_repeat <= 0:
        raise UserError(f"--mib-per-repeat must be > 0, got {args.mib_per_repeat:g}")
    return parse_sizes(args.sizes)


def run(args: argparse.Namespace) -> int:
    comm = mpi().COMM_WORLD
    sizes = agree_on_errors(comm, lambda: check_args(args, comm.Get_size()))
    bench = PSBench(comm, args.servers)
    rows = [bench.measure(size, args.repeats, args.mib_per_repeat) for size in sizes]
    bench.close()
    if comm.Get_rank() == 0:
        result = {"library": library_info()["library"], "ranks": comm.Get_size(),
                  "servers": bench.S, "workers": bench.W, "repeats": args.repeats,
                  "results": rows}
        print(json.dumps(result, indent=2) if args.json else format_table(result), flush=True)
    return 0


def no_duties() -> None:
    """The benchmark's client waits have no heartbeats or watches to keep."""


def bench_roles(comm, n_servers: int) -> Roles:
    MPI = mpi()
    size, rank = comm.Get_size(), comm.Get_rank()
    servers = list(range(size - n_servers, size))
    workers = [r for r in range(size) if r not in servers]
    roles = Roles("asp", rank, size, servers, workers, [0] * size, rank, size, comm=comm,
                  hosts=[""] * size)
    server_comm = comm.Split(0 if roles.is_server else MPI.UNDEFINED, key=rank)
    worker_comm = comm.Split(0 if roles.is_worker else MPI.UNDEFINED, key=rank)
    roles.server_comm = server_comm if server_comm != MPI.COMM_NULL else None
    roles.worker_comm = worker_comm if worker_comm != MPI.COMM_NULL else None
    return roles


class PSBench:
    def __init__(self, comm, n_servers: int):
        self.MPI = mpi()
        self.comm = comm
        self.roles = bench_roles(comm, n_servers)
        self.S, self.W = self.roles.n_servers, self.roles.n_workers
        # the client reads only ps.* keys; no overlap: the push sends from push()
        self.cfg = load_config(None, ["ps.mode=asp", "ps.overlap=false", "ps.compression=none"])

    def close(self) -> None:
        for c in (self.roles.server_comm, self.roles.worker_comm):
            if c is not None:
                c.Free()

    # -- one message size ------------------------------------------------------------------
    def measure(self, size: int, repeats: int, mib_per_repeat: float) -> dict:
        MPI, roles = self.MPI, self.roles
        n = size // 4
        layout = ParamLayout()
        layout.add("w", (n * self.S,))
        ranges = [(s * n, (s + 1) * n) for s in range(self.S)]
        codecs = [ShardCodec(layout, lo, hi, "none") for lo, hi in ranges]
        wins = PSWindows(self.comm, roles, ranges, [c.max_payload_bytes for c in codecs])
        # raw window: one region per worker (put/get) and one shared region (accumulate)
        raw = MPI.Win.Allocate((self.W + 1) * size if roles.is_server else 0, 1, comm=self.comm)
        iters = max(3, int(mib_per_repeat * (1 << 20) // (size * self.S)))
        samples = {v: [] for v in VARIANTS}
        cycles, aggregates = [], {"raw_put": [], "raw_acc": []}
        if roles.is_worker:
            client = PSClient(cfg=self.cfg, shards=ShardSet(roles, ranges, codecs, wins),
                              params=np.zeros(n * self.S, dtype=np.float32), duties=no_duties)
            grads = np.ones(n * self.S, dtype=np.float32)
            local = np.ones(n, dtype=np.float32)
        for rep in range(repeats + 1):  # repeat 0 warms every path up and is dropped
            for variant in VARIANTS:
                if roles.is_server:
                    self._serve(wins)
                    continue
                seconds, wall = self._work(variant, client, wins, raw, grads, local, size, iters)
                self._release_servers(wins)
                if rep == 0:
                    continue
                total = self.roles.worker_comm.allgather((seconds, wall))
                per_worker = [size * self.S * iters / s / 1e9 for s, _ in total]
                samples[variant].append(statistics.fmean(per_worker))
                if variant in aggregates:
                    slowest = max(w for _, w in total)
                    aggregates[variant].append(size * self.S * iters * self.W / slowest / 1e9)
                if variant == "push":
                    cycles.append(size * self.S * iters / wall / 1e9)
        raw.Free()
        wins.free()
        row = {"bytes": size, "ops": iters}
        if roles.world_rank == 0:
            med = {v: statistics.median(x) for v, x in samples.items()}
            row.update({f"{v}_gbs": med[v] for v in VARIANTS})
            row["push_cycle_gbs"] = statistics.median(cycles)
            row["push_ratio"] = med["push"] / med["raw_put"]
            row["pull_ratio"] = med["pull"] / med["raw_get"]
            row["slots_aggregate_gbs"] = statistics.median(aggregates["raw_put"])
            row["accumulate_aggregate_gbs"] = statistics.median(aggregates["raw_acc"])
            row["slots_over_accumulate"] = (row["slots_aggregate_gbs"]
                                            / row["accumulate_aggregate_gbs"])
        return row

    # -- servers: release slots as pushes land, until the workers say stop ----------------
    def _serve(self, wins) -> None:
        L, me = wins.ctl_layout, self.roles.world_rank
        backoff = Backoff()
        while True:
            states = wins.read_block(me, L.slot_state, L.slot_state + self.W)
            full = np.nonzero(states == 1)[0]
            if len(full):
                wins.slots.Sync()
                for w in full:
                    wins.write(me, L.slot_state + int(w), 0)
                backoff.reset()
            elif wins.read(me, C.STOP_REQUEST):
                break
            else:
                backoff.pause()
        wins.write(me, C.STOP_REQUEST, 0)
        self.comm.Barrier()

    def _release_servers(self, wins) -> None:
        self.roles.worker_comm.Barrier()  # every worker finished this variant
        if self.roles.world_rank == self.roles.workers[0]:
            for rank in self.roles.servers:
                wins.write(rank, C.STOP_REQUEST, 1)
        self.comm.Barrier()

    # -- workers: one variant, ``iters`` operations per server ------------------------------
    def _work(self, variant, client, wins, raw, grads, local, size, iters):
        MPI, roles = self.MPI, self.roles
        w = roles.worker_index
        perf = time.perf_counter
        busy = 0.0
        roles.worker_comm.Barrier()
        if variant in ("raw_put", "raw_get", "raw_acc"):
            for rank in roles.servers:
                raw.Lock(rank, MPI.LOCK_SHARED)
        start = perf()
        if variant == "push":
            for i in range(iters):
                self._wait_slots_free(client, wins)
                t0 = perf()
                client.start_push(grads, None)
                client.wait(client.push(i, weight=1.0, loss=0.0, scale=1.0, items=1))
                busy += perf() - t0
        elif variant == "pull":
            for i in range(iters):
                t0 = perf()
                client.wait(client.pull(i))
                busy += perf() - t0
        else:
            disp = size * (self.W if variant == "raw_acc" else w)
            for _ in range(iters):
                for rank in roles.servers:
                    t0 = perf()
                    if variant == "raw_put":
                        raw.Put([local, MPI.FLOAT], rank, (disp, size // 4, MPI.FLOAT))
                    elif variant == "raw_get":
                        raw.Get([local, MPI.FLOAT], rank, (disp, size // 4, MPI.FLOAT))
                    else:
                        raw.Accumulate([local, MPI.FLOAT], rank, (disp, size // 4, MPI.FLOAT),
                                       op=MPI.SUM)
                    raw.Flush(rank)
                    busy += perf() - t0
        wall = perf() - start
        if variant in ("raw_put", "raw_get", "raw_acc"):
            for rank in roles.servers:
                raw.Unlock(rank)
        return busy, wall

    @staticmethod
    def _wait_slots_free(client, wins) -> None:
        backoff = Backoff()
        slot = wins.ctl_layout.slot_state + client.slot
        for rank in client.servers:
            while wins.read(rank, slot) != 0:
                backoff.pause()


def format_table(result: dict) -> str:
    head = (f"hpcps bench ps | {result['library']} | {result['ranks']} ranks: "
            f"{result['servers']} server(s), {result['workers']} worker(s) | median of "
            f"{result['repeats']} repeats, GB/s per worker")
    cols = ("size", "push", "raw put", "ratio", "pull", "raw get", "ratio", "push cycle",
            "slots agg", "acc agg", "slots/acc")
    lines = [head, " ".join(f"{c:>10}" for c in cols)]
    for r in result["results"]:
        size = r["bytes"]
        label = f"{size >> 20}M" if size >= 1 << 20 else f"{size >> 10}K"
        values = (r["push_gbs"], r["raw_put_gbs"], r["push_ratio"], r["pull_gbs"],
                  r["raw_get_gbs"], r["pull_ratio"], r["push_cycle_gbs"],
                  r["slots_aggregate_gbs"], r["accumulate_aggregate_gbs"],
                  r["slots_over_accumulate"])
        lines.append(f"{label:>10} " + " ".join(f"{v:>10.2f}" for v in values))
    return "\n".join(lines)
