"""Every rank's memory, estimated before anything large is allocated, and checked per node.

A job too large for its nodes used to be found out by the OOM killer, minutes in and with
no word from us. ``estimate_rank`` adds up what a rank will hold (servers: shard, optimizer
state, receive slots, update rule; workers: parameters, gradients, push buffers, the
model's activations, logits and scratch at the configured batch, block size and
recomputation; the corpus split in RAM) on top of what the process holds now (the
interpreter, NumPy, MPI). ``check_nodes`` sums the ranks of each node against what the node
can give (``hpcps.runtime.memory.node_memory``: MemAvailable or the cgroup limit) and
raises one ``UserError`` naming the largest term and the settings that would fit.
``hpcps plan`` prints the same estimate without starting a job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from hpcps.errors import UserError
from hpcps.ps.memory import server_bytes, shard_sizes, slot_strides, worker_bytes
from hpcps.ps.options import landing_slots, takes_turns
from hpcps.ps.roles import PS_MODES
from hpcps.runtime.memory import gib, node_memory, peak_rss_bytes, rss_bytes


@dataclass
class RankEstimate:
    rank: int
    node: int
    kind: str                                   # "server" or "worker"
    terms: dict = field(default_factory=dict)   # what it will allocate, by term
    baseline: int = 0                           # what the process holds already

    @property
    def total(self) -> int:
        return self.baseline + sum(self.terms.values())

    @property
    def to_allocate(self) -> int:
        return sum(self.terms.values())

    def largest(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda kv: kv[1]) if self.terms else ("", 0)


@dataclass(frozen=True)
class JobShape:
    """What the estimate needs of a job's layout (from ``Roles``, or planned)."""
    mode: str
    servers: list          # world ranks, in shard order
    workers: list
    node_of: list          # node index of every world rank
    hierarchy: str = "none"

    @classmethod
    def of(cls, roles) -> "JobShape":
        return cls(roles.mode, list(roles.servers), list(roles.workers), list(roles.node_of),
                   roles.hierarchy)

    @property
    def n_pushers(self) -> int:
        if self.hierarchy != "node":
            return len(self.workers)
        return len({self.node_of[r] for r in self.workers})


def model_terms(cfg, workload, recompute: Optional[str] = None,
                batch: Optional[int] = None) -> dict:
    """The model's share of a worker (host memory: on a GPU the activations live there)."""
    if cfg.device == "gpu":
        return {}
    return workload.memory_bytes(cfg.train.batch_size if batch is None else batch,
                                 **({"recompute": recompute} if recompute else {}))


def estimate_rank(cfg, job: JobShape, workload, rank: int, baseline: int = 0,
                  model: Optional[dict] = None, strides: Optional[list] = None) -> RankEstimate:
    """What world rank ``rank`` of this job will hold. model: the worker's model terms
    (``model_terms``) and strides: the shards' slot sizes, when the caller has them."""
    total = workload.layout.total
    node = job.node_of[rank] if rank < len(job.node_of) else 0
    if job.mode in PS_MODES and strides is None:
        strides = slot_strides(cfg, workload.layout, len(job.servers))
    if job.mode in PS_MODES and rank in job.servers:
        index = job.servers.index(rank)
        n = shard_sizes(total, len(job.servers))[index]
        terms = server_bytes(cfg, n, strides[index], len(job.workers), job.n_pushers, job.mode)
        return RankEstimate(rank, node, "server", terms, baseline)
    if job.mode in PS_MODES:
        terms = worker_bytes(cfg, total, strides)
    else:   # single / allreduce: a replica of the parameters and the optimizer on every rank
        state = 2 if cfg.train.optimizer == "adamw" else 1
        terms = {"parameters + gradients": 8 * total, "optimizer state": 4 * total * state}
        if job.mode == "single" and cfg.checkpoint.every and cfg.checkpoint.background:
            terms["checkpoint snapshot"] = 4 * total * (1 + state)   # saved while training
    terms.update(model if model is not None else model_terms(cfg, workload))
    terms.update(workload.data_bytes())
    return RankEstimate(rank, node, "worker", {k: v for k, v in terms.items() if v}, baseline)


def estimate_job(cfg, job: JobShape, workload, baselines: dict, **model_kw) -> list:
    """Every rank's estimate (model terms and slot sizes computed once for all ranks)."""
    model = model_terms(cfg, workload, **model_kw)
    strides = slot_strides(cfg, workload.layout, len(job.servers)) if job.mode in PS_MODES \
        else None
    return [estimate_rank(cfg, job, workload, r, baselines.get(r, 0), model, strides)
            for r in range(len(job.node_of))]


def node_needs(estimates: list) -> dict:
    """node -> bytes its ranks will still allocate."""
    out: dict = {}
    for e in estimates:
        out[e.node] = out.get(e.node, 0) + e.to_allocate
    return out


def overfull_nodes(estimates: list, memory: dict) -> list:
    """[(node, needs, NodeMemory)] of the nodes whose ranks would not fit."""
    return [(node, need, memory[node]) for node, need in sorted(node_needs(estimates).items())
            if need > memory[node].available]


def check_nodes(cfg, job: JobShape, workload, estimates: list, memory: dict,
                hosts: Optional[list] = None) -> None:
    """Raise one UserError when a node's ranks would not fit in what the node can give."""
    over = overfull_nodes(estimates, memory)
    if not over:
        return
    node, need, mem = max(over, key=lambda x: x[1] - x[2].available)
    on_node = [e for e in estimates if e.node == node]
    worst = max(on_node, key=lambda e: e.largest()[1])
    term, size = worst.largest()
    host = f" ({hosts[on_node[0].rank]})" if hosts else ""
    raise UserError(
        f"not enough memory: the {len(on_node)} rank(s) on node {node}{host} need about "
        f"{gib(need)} more but it has {mem.describe()}; largest term: {worst.kind} rank "
        f"{worst.rank}'s {term} ({gib(size)}); {fitting_settings(cfg, job, workload, estimates, memory)} "
        f"(train.memory_check=false skips this check)")


def fitting_settings(cfg, job: JobShape, workload, estimates: list, memory: dict) -> str:
    """The first settings, cheapest in speed first, under which every node would fit."""
    baselines = {e.rank: e.baseline for e in estimates}
    fits = []

    def ok(est) -> bool:
        return not overfull_nodes(est, memory)

    recompute = getattr(cfg.train, "recompute", "none")
    has_model = bool(model_terms(cfg, workload))
    can_recompute = has_model and workload.recomputes
    if can_recompute:
        for mode in ("attention", "block"):
            if mode != recompute and _order(mode) > _order(recompute) and \
                    ok(estimate_job(cfg, job, workload, baselines, recompute=mode)):
                fits.append(f"train.recompute={mode}")
                break
    if takes_turns(cfg, job.mode) and landing_slots(cfg, job.mode, job.n_pushers) > 1:
        if ok(estimate_job(cfg.replace(ps__slots=1), job, workload, baselines)):
            fits.append("ps.slots=1")
    if job.mode in PS_MODES and job.hierarchy != "node" and len(set(job.node_of)) < len(job.workers):
        flat = JobShape(job.mode, job.servers, job.workers, job.node_of, "node")
        if ok(estimate_job(cfg, flat, workload, baselines)):
            fits.append("ps.hierarchy=node")
    if has_model:
        for mode in dict.fromkeys((recompute, "block") if can_recompute else (recompute,)):
            batch = _largest_batch(cfg, job, workload, baselines, memory, mode)
            if batch:
                fits.append(f"train.batch_size={batch}" +
                            ("" if mode == recompute else f" with train.recompute={mode}"))
    if fits:
        return "would fit: " + " or ".join(fits)
    per_node = min(m.available for m in memory.values())
    if has_model:
        lean = estimate_job(cfg, job, workload, baselines,
                            **({"recompute": "block"} if can_recompute else {}), batch=1)
        worker = max((e for e in lean if e.kind == "worker"), key=lambda e: e.to_allocate)
        if worker.to_allocate > per_node:
            lean_setting = "train.batch_size=1" + (" with train.recompute=block"
                                                   if can_recompute else "")
            return (f"no setting fits: one worker alone needs {gib(worker.to_allocate)} (its "
                    f"parameters, gradients and, at {lean_setting}, its activations), more "
                    f"than a node's {gib(per_node)}: use a smaller model or nodes with more "
                    f"memory")
    nodes = max(math.ceil(sum(e.to_allocate for e in estimates) / max(per_node, 1)),
                len(memory) + 1)
    return (f"no setting fits on {len(memory)} node(s) like these: spread the job over at "
            f"least {nodes} such nodes (one server shard per node, ps.servers=auto)")


def _largest_batch(cfg, job, workload, baselines: dict, memory: dict, recompute: str) -> int:
    """The largest batch below the configured one that fits (0: none), by bisection."""
    lo, hi = 0, cfg.train.batch_size      # lo fits (0: trivially), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        est = estimate_job(cfg, job, workload, baselines, recompute=recompute, batch=mid)
        lo, hi = (mid, hi) if not overfull_nodes(est, memory) else (lo, mid)
    return lo


def _order(mode: str) -> int:
    return ("none", "attention", "block").index(mode)


def describe_estimates(estimates: list) -> str:
    """One banner line: each rank's estimated total (kind initial, GiB)."""
    return " ".join(f"r{e.rank}:{e.kind[0]}={e.total / 2**30:.2f}GiB" for e in estimates)


def nodes_memory(items: list) -> dict:
    """node -> the smallest NodeMemory its ranks reported (one cgroup may be tighter)."""
    out: dict = {}
    for node, mem in items:
        if node not in out or mem.available < out[node].available:
            out[node] = mem
    return out



# -- in a job ----------------------------------------------------------------------------

def check_job_memory(cfg, roles, workload, comm) -> list:
    """Collective: every rank's estimate, checked per node before anything large is
    allocated; raises the same UserError on every rank when a node would not fit.
    Returns the estimates (for the banner and the end-of-run comparison)."""
    facts = (rss_bytes(), node_memory())
    gathered = comm.allgather(facts) if comm is not None else [facts]
    job = JobShape.of(roles)
    estimates = estimate_job(cfg, job, workload, {r: f[0] for r, f in enumerate(gathered)})
    if cfg.train.memory_check:
        memory = nodes_memory([(job.node_of[r], f[1]) for r, f in enumerate(gathered)])
        check_nodes(cfg, job, workload, estimates, memory, roles.hosts)
    return estimates


def peak_report(estimates: list, comm) -> Optional[dict]:
    """Collective: {rank: (kind, estimate, measured peak)} on rank 0 (None elsewhere)."""
    peak = peak_rss_bytes()
    peaks = comm.gather(peak, root=0) if comm is not None else [peak]
    if peaks is None:
        return None
    return {e.rank: {"kind": e.kind, "estimate_bytes": e.total, "peak_bytes": p}
            for e, p in zip(estimates, peaks)}


def describe_peaks(report: dict) -> str:
    return "peak memory per rank (estimate / measured): " + " ".join(
        f"r{r}:{v['kind'][0]}={v['estimate_bytes'] / 2**30:.2f}/{v['peak_bytes'] / 2**30:.2f}GiB"
        for r, v in sorted(report.items()))
