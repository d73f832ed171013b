"""A cost model of one bsp step of the parameter server (docs/scaling.md).

For S server shards of n = P / S elements each and Q pushers (W workers, or one
leader per node with ``ps.hierarchy = node``), one step costs, on the critical path:

    T = compute + overhead + k * atomic              (control round trips)
        + 2 * Q * n * 4 * per_byte                   (Q pushes in and Q pulls out of a shard)
        + Q * n * decode + n * update                (weighted mean of Q pushes, AdamW)
        [+ L * P * 4 * node_byte                     (hierarchy: the node's shared-memory reduce)]

``per_byte`` and ``atomic`` depend on the path (shared memory, a network module, a cluster
link); ``decode`` and ``update`` on the server's CPU. The parameters are fitted to step
times measured on one machine (``benchmarks/scaling.py``) by least squares on relative
error; the same formula then predicts other layouts and clusters from their parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

ROUND_TRIPS = 8        # control atomics on a bsp step's critical path (version, gate, flag, ...)


@dataclass(frozen=True)
class Layout:
    """One job's shape."""
    workers: int
    servers: int
    nodes: int
    elements: int              # P, parameters in the flat buffer
    compute_s: float           # forward + backward of one worker's batch
    path: str                  # a key of Machine.per_byte / atomic: "shm", "net", "cluster"
    cores: int = 0             # informational
    hierarchy: bool = False

    @property
    def pushers(self) -> int:
        return self.nodes if self.hierarchy else self.workers


@dataclass
class Machine:
    """Fitted (or assumed) costs; seconds."""
    overhead: float = 0.0
    update: float = 0.0                  # per shard element (AdamW)
    decode: float = 0.0                  # per element per push (weighted mean)
    node_byte: float = 0.0               # per byte of the node-local reduce (hierarchy)
    per_byte: dict = field(default_factory=dict)   # path -> seconds per byte through a shard
    atomic: dict = field(default_factory=dict)     # path -> seconds per control round trip

    def as_dict(self) -> dict:
        return asdict(self)


def terms(layout: Layout, paths: list[str]) -> np.ndarray:
    """The model's features, in the order of ``_unpack``: T - compute = terms . params."""
    n = layout.elements / layout.servers
    q = layout.pushers
    row = [1.0, n, q * n]
    row += [2.0 * q * n * 4.0 if p == layout.path else 0.0 for p in paths]
    row += [float(ROUND_TRIPS) if p == layout.path else 0.0 for p in paths]
    return np.array(row)


def predict_step_s(layout: Layout, m: Machine) -> float:
    n = layout.elements / layout.servers
    q = layout.pushers
    t = (layout.compute_s + m.overhead + ROUND_TRIPS * m.atomic[layout.path]
         + 2.0 * q * n * 4.0 * m.per_byte[layout.path] + q * n * m.decode + n * m.update)
    if layout.hierarchy:
        per_node = layout.workers / layout.nodes
        t += per_node * layout.elements * 4.0 * m.node_byte
    return t


def fit(layouts: list[Layout], measured: list[float]) -> Machine:
    """Least squares on relative error; parameters kept >= 0."""
    paths = sorted({x.path for x in layouts})
    a = np.array([terms(x, paths) for x in layouts])
    b = np.array([t - x.compute_s for x, t in zip(layouts, measured)])
    w = 1.0 / np.asarray(measured)
    params = _nonnegative_lstsq(a * w[:, None], b * w)
    k = len(paths)
    return Machine(overhead=params[0], update=params[1], decode=params[2],
                   per_byte=dict(zip(paths, params[3:3 + k])),
                   atomic=dict(zip(paths, params[3 + k:3 + 2 * k])))


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray, rounds: int = 20) -> np.ndarray:
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
