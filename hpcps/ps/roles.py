"""Who is a server shard and who is a worker inside one mpirun.

Servers are spread across nodes (found with a ``COMM_TYPE_SHARED`` split):
server k goes to node k mod n_nodes and takes that node's highest free local
rank, so world rank 0 stays a worker (it writes metrics) whenever it can.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from hpcps.config.schema import AUTO
from hpcps.errors import UserError
from hpcps.runtime.mpi import mpi

PS_MODES = ("bsp", "ssp", "asp")


@dataclass
class Roles:
    mode: str                       # single | bsp | ssp | asp | allreduce
    world_rank: int
    world_size: int
    servers: list[int]              # world ranks, in shard order
    workers: list[int]              # world ranks, in worker-index order
    node_of: list[int]              # node index of every world rank
    local_rank: int                 # rank within this node (GPU selection)
    local_size: int
    comm: object = None             # world communicator (None in single mode)
    server_comm: object = None      # servers only (None elsewhere)
    worker_comm: object = None      # workers only (None elsewhere)
    hosts: list[str] = field(default_factory=list)

    @property
    def is_server(self) -> bool:
        return self.world_rank in self.servers

    @property
    def is_worker(self) -> bool:
        return self.world_rank in self.workers

    @property
    def server_index(self) -> int:
        return self.servers.index(self.world_rank)

    @property
    def worker_index(self) -> int:
        return self.workers.index(self.world_rank)

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def n_servers(self) -> int:
        return len(self.servers)

    @property
    def n_nodes(self) -> int:
        return max(self.node_of) + 1 if self.node_of else 1

    @property
    def lead_worker(self) -> int:
        """World rank that writes metrics and prints progress."""
        return self.workers[0]

    def describe(self) -> str:
        if self.mode == "single":
            return "single process"
        text = (f"{self.mode}: {self.world_size} ranks on {self.n_nodes} node(s), "
                f"{len(self.servers)} server(s) {self.servers}, {len(self.workers)} worker(s)")
        return text


def resolve_mode(mode: str, world_size: int) -> str:
    if mode == "auto":
        return "single" if world_size == 1 else "bsp"
    if mode in PS_MODES and world_size < 2:
        raise UserError(f"ps.mode = {mode} needs at least 2 ranks (servers + workers); this job has "
                        f"{world_size}: launch with mpirun -n N or use ps.mode = single")
    if mode == "single" and world_size > 1:
        raise UserError(f"ps.mode = single runs one process, but this job has {world_size} ranks")
    return mode


def choose_server_count(requested, world_size: int, n_nodes: int) -> int:
    if requested == AUTO:
        return max(1, min(n_nodes, world_size - 1))
    if requested >= world_size:
        raise UserError(f"ps.servers = {requested} leaves no worker in a job of {world_size} ranks "
                        f"(at most {world_size - 1})")
    return int(requested)


def place_servers(node_of: list[int], n_servers: int) -> list[int]:
    """Round-robin over nodes, highest local ranks first; returns sorted-by-shard world ranks."""
    by_node: dict[int, list[int]] = {}
    for rank, node in enumerate(node_of):
        by_node.setdefault(node, []).append(rank)
    free = {node: sorted(ranks, reverse=True) for node, ranks in by_node.items()}
    chosen: list[int] = []
    nodes = sorted(free)
    k = 0
    while len(chosen) < n_servers:
        node = nodes[k % len(nodes)]
        if free[node]:
            chosen.append(free[node].pop(0))
        k += 1
    return sorted(chosen)


def build_roles(cfg, comm) -> Roles:
    """Collective over ``comm`` (all ranks compute the same layout). A one-rank job has
    no communicator in single mode (nothing to talk to)."""
    if comm.Get_size() == 1:
        mode = resolve_mode(cfg.ps.mode, 1)
        return Roles(mode, 0, 1, [], [0], [0], 0, 1, comm=None if mode == "single" else comm,
                     hosts=[socket.gethostname()])
    MPI = mpi()
    size, rank = comm.Get_size(), comm.Get_rank()
    mode = resolve_mode(cfg.ps.mode, size)
    node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node_comm.Get_rank(), node_comm.Get_size()
    leaders = comm.allgather(rank if local_rank == 0 else -1)
    node_leader = node_comm.bcast(rank if local_rank == 0 else None, root=0)
    node_comm.Free()
    leader_ids = sorted(r for r in leaders if r >= 0)
    node_of = [leader_ids.index(x) for x in comm.allgather(node_leader)]
    hosts = comm.allgather(socket.gethostname())
    if mode in PS_MODES:
        n_servers = choose_server_count(cfg.ps.servers, size, len(leader_ids))
        servers = place_servers(node_of, n_servers)
    else:
        servers = []
    workers = [r for r in range(size) if r not in servers]
    roles = Roles(mode, rank, size, servers, workers, node_of, local_rank, local_size, comm=comm,
                  hosts=hosts)
    color_s = 0 if roles.is_server else MPI.UNDEFINED
    color_w = 0 if roles.is_worker else MPI.UNDEFINED
    roles.server_comm = comm.Split(color_s, key=rank)
    roles.worker_comm = comm.Split(color_w, key=rank)
    if roles.server_comm == MPI.COMM_NULL:
        roles.server_comm = None
    if roles.worker_comm == MPI.COMM_NULL:
        roles.worker_comm = None
    return roles
