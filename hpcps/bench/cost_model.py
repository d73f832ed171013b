"""A cost model of one bsp step of the parameter server (docs/scaling.md).

For S server shards of n = P / S elements, W workers and Q pushers (W, or one leader
per node with ``ps.hierarchy = node``), with r = ranks per core on a node (ranks that
share cores wait for one another), one step costs

    T = compute + overhead + n * update + Q * n * decode     (the server's optimizer, mean)
        + 2 * Q * n * 4 * per_byte                           (Q pushes in, Q pulls out of a shard)
        + S * atomic                                         (a worker's round trips to S shards)
        + S * r * wait                                       (... each waiting for its target's core)
        + W * r * serve                                      (a shard serving every worker's atomics)
        [+ (W / nodes) * P * 4 * node_byte]                  (hierarchy: the node's shared reduce)

With local steps (``ps.local_steps = H``) a worker synchronizes once per H inner steps,
and each inner step adds its own optimizer update on the replica:

    T_local = compute + inner_update + (T - compute) / H

``per_byte``, ``atomic``, ``wait`` and ``serve`` depend on the path (shared memory, a
network module, a cluster's links); ``update`` and ``decode`` on the server's CPU. The
parameters are fitted to step times measured on one machine (``benchmarks/scaling.py``)
by least squares on relative error; the same formula predicts other layouts and, with
a cluster's parameters, other machines.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from hpcps.optim.adamw import AdamW

PATH_TERMS = ("per_byte", "atomic", "wait", "serve")


@dataclass(frozen=True)
class Layout:
    """One job's shape."""
    workers: int
    servers: int
    nodes: int
    elements: int              # P, parameters in the flat buffer
    compute_s: float           # forward + backward of one worker's batch
    path: str                  # "shm", "net", or a cluster's name in Machine's path dicts
    cores: int                 # cores per node
    hierarchy: bool = False

    @property
    def pushers(self) -> int:
        return self.nodes if self.hierarchy else self.workers

    @property
    def ranks_per_core(self) -> float:
        """How many ranks share a core (at least 1: a rank cannot have more than a core)."""
        return max(1.0, (self.workers + self.servers) / (self.nodes * self.cores))


@dataclass
class Machine:
    """Fitted (or assumed) costs, in seconds."""
    overhead: float = 0.0
    update: float = 0.0                   # per shard element (AdamW)
    decode: float = 0.0                   # per element per push (the weighted mean)
    node_byte: float = 0.0                # per byte of the node-local reduce (hierarchy)
    per_byte: dict = field(default_factory=dict)   # path -> per byte into or out of a shard
    atomic: dict = field(default_factory=dict)     # path -> per worker round trip to a shard
    wait: dict = field(default_factory=dict)       # path -> ... per rank sharing the target's core
    serve: dict = field(default_factory=dict)      # path -> per worker served, per rank per core

    def as_dict(self) -> dict:
        return asdict(self)


# A cluster the model predicts (docs/scaling.md): 64 nodes x 4 GPUs (one worker each) and one
# CPU server per node, GPT-2 124M, 100 Gb/s links. Link costs are assumed, not fitted: RDMA
# round trip 5 us, 1 us of a server's time per worker's atomics, no core sharing; a worker's
# forward + backward of 12 x 1024 tokens: 6 x 124e6 x 12288 FLOP at 40 % of 312 TFLOP/s ~ 73 ms.
CLUSTER = {"nodes": 64, "gpus_per_node": 4, "elements": 124_439_808, "compute_s": 0.073,
           "link_bytes_per_s": 100e9 / 8, "atomic_s": 5e-6, "serve_s": 1e-6,
           "node_reduce_bytes_per_s": 20e9}

# The server CPU and shared-memory terms fitted on the 2-core reference machine
# (docs/scaling.md, "Fitted and checked on this machine"); ``hpcps plan`` uses them.
REFERENCE = {"overhead": 0.0, "update": 2.25e-9, "decode": 0.08e-9,
             "shm": {"per_byte": 0.22e-9, "atomic": 0.07e-3, "wait": 0.35e-3, "serve": 3e-6}}


def cluster_machine(cpu: Machine, push_bytes: int = 4,
                    link_bytes_per_s: float = CLUSTER["link_bytes_per_s"]) -> Machine:
    """``cpu``'s server terms with ``CLUSTER``'s assumed links (path "ib"): a push of
    push_bytes per element in, an fp32 pull out, through one link per node."""
    c = CLUSTER
    per_byte = (1.0 + push_bytes / 4.0) / 2.0 / link_bytes_per_s
    return Machine(overhead=cpu.overhead, update=cpu.update, decode=cpu.decode,
                   node_byte=1.0 / c["node_reduce_bytes_per_s"], per_byte={"ib": per_byte},
                   atomic={"ib": c["atomic_s"]}, wait={"ib": 0.0}, serve={"ib": c["serve_s"]})


def reference_machine() -> Machine:
    r = REFERENCE
    return Machine(overhead=r["overhead"], update=r["update"], decode=r["decode"],
                   node_byte=1.0 / CLUSTER["node_reduce_bytes_per_s"],
                   **{term: {"shm": r["shm"][term]} for term in PATH_TERMS})


def link_seconds(layout: Layout, m: Machine) -> float:
    """The busiest link's share of a step: a shard's pushes in and pulls out."""
    return 2.0 * layout.pushers * (layout.elements / layout.servers) * 4.0 * m.per_byte[layout.path]


def features(layout: Layout, paths: list[str]) -> np.ndarray:
    """T - compute = features . parameters, parameters in the order ``fit`` unpacks."""
    n = layout.elements / layout.servers
    q, s, w, r = layout.pushers, layout.servers, layout.workers, layout.ranks_per_core
    row = [1.0, n, q * n]
    for path in paths:
        on = float(path == layout.path)
        row += [on * 2.0 * q * n * 4.0, on * s, on * s * r, on * w * r]
    return np.array(row)


def predict_step_s(layout: Layout, m: Machine) -> float:
    n = layout.elements / layout.servers
    q, s, w, r = layout.pushers, layout.servers, layout.workers, layout.ranks_per_core
    p = layout.path
    t = (layout.compute_s + m.overhead + n * m.update + q * n * m.decode
         + 2.0 * q * n * 4.0 * m.per_byte[p] + s * m.atomic[p] + s * r * m.wait[p]
         + w * r * m.serve[p])
    if layout.hierarchy:
        t += (layout.workers / layout.nodes) * layout.elements * 4.0 * m.node_byte
    return t


def predict_local_step_s(layout: Layout, m: Machine, local_steps: int,
                         inner_update_s: float) -> float:
    """Mean time per inner step with local steps: the bsp step's synchronization (pushes,
    pulls, the servers' update) paid once per ``local_steps``, plus the worker's own
    optimizer update of the replica (``inner_update_s``) every step."""
    sync = predict_step_s(layout, m) - layout.compute_s
    return layout.compute_s + inner_update_s + sync / local_steps


def fit(layouts: list[Layout], measured: list[float], update: float | None = None) -> Machine:
    """Least squares on relative error, every parameter kept >= 0. ``update``: the
    optimizer's seconds per element measured on its own (``measure_update``); the fit
    then leaves that term alone (it is collinear enough with the per-byte terms that
    least squares would trade one for the other)."""
    paths = sorted({x.path for x in layouts})
    a = np.array([features(x, paths) for x in layouts])
    b = np.array([t - x.compute_s for x, t in zip(layouts, measured)])
    if update is not None:
        b = b - a[:, 1] * update
        a[:, 1] = 0.0
    w = 1.0 / np.asarray(measured)
    x = _nonnegative_lstsq(a * w[:, None], b * w)
    m = Machine(overhead=x[0], update=x[1] if update is None else update, decode=x[2])
    for i, path in enumerate(paths):
        for j, term in enumerate(PATH_TERMS):
            getattr(m, term)[path] = float(x[3 + 4 * i + j])
    return m


def measure_update(elements: int = 1 << 20, repeats: int = 7) -> float:
    """Seconds per element of one AdamW step on this CPU (the server's update), median."""
    opt = AdamW(elements, [(0, elements)], weight_decay=0.1)
    params = np.ones(elements, dtype=np.float32)
    grad = np.full(elements, 1e-3, dtype=np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step(params, grad, lr=1e-3)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) / elements


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray, rounds: int = 30) -> np.ndarray:
    """Least squares with negative coefficients clamped to 0 and refitted (active set)."""
    free = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    for _ in range(rounds):
        x[:] = 0.0
        x[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        if (x >= 0).all():
            return x
        free &= x > 0
    x[~free] = 0.0
    return x
