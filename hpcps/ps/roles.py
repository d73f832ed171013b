"""Who is a server shard, who is a worker, and who pushes, inside one mpirun.

Nodes are found with a ``COMM_TYPE_SHARED`` split. Servers are spread across
them: server k goes to node k mod n_nodes and takes that node's highest free local
rank, so world rank 0 stays a worker (it writes metrics) whenever it can. By
default there is one server per node, but never more servers than workers: a
cluster user launching one rank per node gets workers to train with.

With ``ps.hierarchy = "node"`` the workers of a node reduce their gradients in
shared memory and one of them, the node's *leader* (its first worker), pushes to
and pulls from the servers for all of them: the *pushers* are the leaders.
Without it every worker is a pusher.
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
    """This rank's view of the job's layout (the same on every rank, but ``world_rank``)."""
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
    hierarchy: str = "none"         # none | node (see the module docstring)
    server_reason: str = ""         # why this many servers (for the banner)

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

    @property
    def node_workers(self) -> list[int]:
        """The workers on this rank's node, in worker order (world ranks)."""
        node = self.node_of[self.world_rank]
        return [r for r in self.workers if self.node_of[r] == node]

    @property
    def pushers(self) -> list[int]:
        """World ranks that push to and pull from the servers, in pusher order."""
        if self.hierarchy != "node":
            return self.workers
        leaders: dict = {}
        for r in self.workers:
            leaders.setdefault(self.node_of[r], r)
        return sorted(leaders.values(), key=self.workers.index)

    @property
    def n_pushers(self) -> int:
        return len(self.pushers)

    @property
    def is_pusher(self) -> bool:
        return self.world_rank in self.pushers

    @property
    def pusher_index(self) -> int:
        """This rank's pusher slot: its own, or its node leader's."""
        leader = self.node_workers[0] if self.hierarchy == "node" else self.world_rank
        return self.pushers.index(leader)

    def describe(self) -> str:
        if self.mode == "single":
            return "single process"
        text = (f"{self.mode}: {self.world_size} ranks on {self.n_nodes} node(s), "
                f"{len(self.servers)} server(s) {self.servers}"
                f"{f' ({self.server_reason})' if self.server_reason else ''}, "
                f"{len(self.workers)} worker(s)")
        if self.hierarchy == "node":
            text += f", node hierarchy: {self.n_pushers} pusher(s) {self.pushers}"
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


def choose_server_count(requested, world_size: int, n_nodes: int) -> tuple[int, str]:
    """(servers, why). Auto: one per node, but never more servers than workers."""
    if requested == AUTO:
        n = max(1, min(n_nodes, world_size // 2))
        if n == n_nodes:
            return n, "auto: one per node"
        return n, (f"auto: one per node would leave fewer workers than servers on "
                   f"{world_size} ranks")
    if requested >= world_size:
        raise UserError(f"ps.servers = {requested} leaves no worker in a job of {world_size} ranks "
                        f"(at most {world_size - 1})")
    return int(requested), ""


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


def check_hierarchy(cfg, mode: str, node_of: list[int], workers: list[int], hosts: list[str]) -> None:
    """``ps.hierarchy = "node"`` needs a parameter-server mode, the CPU, and a worker on
    every node (a node of servers only would have nobody to push for it)."""
    if cfg.ps.hierarchy != "node":
        return
    if mode not in PS_MODES:
        raise UserError(f"ps.hierarchy = node applies to the parameter-server modes "
                        f"({', '.join(PS_MODES)}), not ps.mode = {mode}")
    if cfg.device != "cpu":
        raise UserError("ps.hierarchy = node reduces gradients in host shared memory: it needs "
                        "device = cpu")
    with_workers = {node_of[r] for r in workers}
    for node in sorted(set(node_of)):
        if node not in with_workers:
            ranks = [r for r, n in enumerate(node_of) if n == node]
            raise UserError(f"ps.hierarchy = node needs a worker on every node, but node {node} "
                            f"({hosts[ranks[0]]}) holds only server rank(s) {ranks}: use fewer "
                            f"ps.servers or more ranks per node")


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
    servers, reason = [], ""
    if mode in PS_MODES:
        n_servers, reason = choose_server_count(cfg.ps.servers, size, len(leader_ids))
        servers = place_servers(node_of, n_servers)
    workers = [r for r in range(size) if r not in servers]
    check_hierarchy(cfg, mode, node_of, workers, hosts)
    roles = Roles(mode, rank, size, servers, workers, node_of, local_rank, local_size, comm=comm,
                  hosts=hosts, hierarchy=cfg.ps.hierarchy, server_reason=reason)
    color_s = 0 if roles.is_server else MPI.UNDEFINED
    color_w = 0 if roles.is_worker else MPI.UNDEFINED
    roles.server_comm = comm.Split(color_s, key=rank)
    roles.worker_comm = comm.Split(color_w, key=rank)
    if roles.server_comm == MPI.COMM_NULL:
        roles.server_comm = None
    if roles.worker_comm == MPI.COMM_NULL:
        roles.worker_comm = None
    return roles
