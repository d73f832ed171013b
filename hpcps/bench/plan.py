"""``hpcps plan``: a job's memory per rank and its bsp step time, on paper, before it starts.

The layout is what ``mpirun -n RANKS`` over NODES nodes would get (ranks filled node by
node, servers placed as ``hpcps.ps.roles`` places them), the memory is the start-up
check's estimate (``hpcps.train.memory``), and the step time is the cost model of
docs/scaling.md (``hpcps.bench.cost_model``): shared memory on one node with the
reference machine's fitted terms, the assumed cluster links across nodes. The model's
compute is 6 · P FLOP per token (as docs/scaling.md) at ``--mfu`` of ``--peak-flops``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from hpcps.backend import CPU
from hpcps.bench.cost_model import (
    CLUSTER,
    Layout,
    cluster_machine,
    link_seconds,
    predict_local_step_s,
    predict_step_s,
    reference_machine,
)
from hpcps.errors import UserError
from hpcps.model.gpt import GPT
from hpcps.ps.roles import PS_MODES, choose_server_count, place_servers, resolve_mode
from hpcps.runtime.memory import gib, node_memory, rss_bytes
from hpcps.train.memory import JobShape, estimate_job, node_needs
from hpcps.workloads import build_workload

GPU_PEAK_FLOPS = 312e12      # an A100's bf16 tensor cores (docs/scaling.md's assumption)
CPU_CORE_FLOPS = 125e9       # fp32 GEMM per core on the reference machine (docs/benchmarks.md)
PUSH_BYTES = {"none": 4, "fp16": 2, "bf16": 2}


@dataclass
class ModelOnly:
    """A GPT built from the config alone (no corpus on this machine): what the estimate
    needs of a workload, without data."""
    model: GPT
    recomputes = True

    @property
    def layout(self):
        return self.model.layout

    def memory_bytes(self, batch: int, recompute: Optional[str] = None) -> dict:
        return self.model.memory_bytes(batch, recompute)

    def data_bytes(self) -> dict:
        return {}


def planned_workload(cfg, vocab_size: Optional[int]):
    """The configured workload (its corpus read for the vocabulary), or, for a GPT whose
    corpus is not here, the model alone at ``vocab_size`` (GPT-2's 50257 by default)."""
    if cfg.data.path and os.path.exists(cfg.data.path) and vocab_size is None:
        return build_workload(cfg, CPU), None
    if cfg.workload != "gpt":
        raise UserError(f"hpcps plan needs the corpus of workload '{cfg.workload}' "
                        f"(data.path = {cfg.data.path!r} is not here)")
    m = cfg.model
    vocab = vocab_size or 50257
    model = GPT(vocab_size=vocab, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                block_size=m.block_size, bias=m.bias, dropout=m.dropout,
                tie_embeddings=m.tie_embeddings, threads=1, recompute=cfg.train.recompute)
    note = (f"vocabulary {vocab:,} assumed (corpus {cfg.data.path or '(none)'} not here; "
            f"--vocab-size to change)")
    return ModelOnly(model), note


def job_shape(cfg, ranks: int, nodes: int) -> JobShape:
    if ranks < 1 or nodes < 1 or nodes > ranks:
        raise UserError(f"--ranks ({ranks}) and --nodes ({nodes}) must be positive, with at "
                        "least one rank per node")
    per_node = math.ceil(ranks / nodes)
    node_of = [r // per_node for r in range(ranks)]
    mode = resolve_mode(cfg.ps.mode, ranks)
    servers = []
    if mode in PS_MODES:
        n, _ = choose_server_count(cfg.ps.servers, ranks, max(node_of) + 1)
        servers = place_servers(node_of, n)
    workers = [r for r in range(ranks) if r not in servers]
    return JobShape(mode, servers, workers, node_of, cfg.ps.hierarchy)


def step_layout(cfg, job: JobShape, elements: int, compute_s: float, cores: int,
                servers: Optional[int] = None, hierarchy: Optional[str] = None) -> Layout:
    nodes = len(set(job.node_of))
    return Layout(workers=len(job.workers), servers=servers or len(job.servers), nodes=nodes,
                  elements=elements, compute_s=compute_s, path="shm" if nodes == 1 else "ib",
                  cores=cores, hierarchy=(hierarchy or job.hierarchy) == "node")


def step_machine(layout: Layout, push_bytes: int, link_gbps: float):
    if layout.path == "shm":
        return reference_machine()
    return cluster_machine(reference_machine(), push_bytes, link_gbps * 1e9 / 8)


def compute_seconds(cfg, elements: int, peak_flops: Optional[float], mfu: float) -> float:
    """A worker's forward + backward: 6 P FLOP per token at mfu of the peak."""
    tokens = cfg.train.batch_size * cfg.model.block_size
    if peak_flops is None:
        peak_flops = cfg.train.peak_flops or (GPU_PEAK_FLOPS if cfg.device == "gpu"
                                              else CPU_CORE_FLOPS)
    return 6.0 * elements * tokens / (peak_flops * mfu)


def plan(cfg, ranks: int, nodes: int, *, vocab_size: Optional[int] = None,
         peak_flops: Optional[float] = None, mfu: float = 0.4,
         link_gbps: float = 8 * CLUSTER["link_bytes_per_s"] / 1e9,
         cores: Optional[int] = None) -> dict:
    """Everything ``hpcps plan`` prints, as data. cores: per node (default: this machine's
    on one node, 64 across nodes, as docs/scaling.md's cluster)."""
    workload, note = planned_workload(cfg, vocab_size)
    job = job_shape(cfg, ranks, nodes)
    cores = cores or (os.cpu_count() or 1 if nodes == 1 else 64)
    baseline = rss_bytes()
    estimates = estimate_job(cfg, job, workload, {r: baseline for r in range(ranks)})
    elements = workload.layout.total
    out = {"params": elements, "job": job, "estimates": estimates, "note": note,
           "node_needs": node_needs(estimates), "here": node_memory(), "baseline": baseline}
    if cfg.device == "gpu":
        out["device_terms"] = workload.memory_bytes(cfg.train.batch_size)
    if job.mode in PS_MODES and job.mode != "single":
        compute = compute_seconds(cfg, elements, peak_flops, mfu)
        push = PUSH_BYTES.get(cfg.ps.compression, 4)
        layout = step_layout(cfg, job, elements, compute, cores)
        machine = step_machine(layout, push, link_gbps)
        out["step"] = _row(layout, machine, cfg.ps.hierarchy, cfg.ps.compression)
        out["alternatives"] = _alternatives(cfg, job, elements, compute, cores, link_gbps)
        inner = inner_update_seconds(cfg, elements)
        out["local"] = {h: _local_row(layout, machine, h, inner)
                        for h in sorted({cfg.ps.local_steps or 50, 50, 500})}
    return out


def inner_update_seconds(cfg, elements: int) -> float:
    """A local-steps worker's own AdamW step: ~28 bytes of memory traffic per parameter at
    an assumed 2 TB/s on a GPU; on a CPU the reference machine's measured AdamW cost."""
    if cfg.device == "gpu":
        return elements * 28 / 2e12
    return elements * reference_machine().update


def _local_row(layout: Layout, machine, local_steps: int, inner_s: float) -> dict:
    step = predict_local_step_s(layout, machine, local_steps, inner_s)
    return {"local_steps": local_steps, "step_s": step,
            "compute_share": layout.compute_s / step}


def _row(layout: Layout, machine, hierarchy: str, compression: str) -> dict:
    total = predict_step_s(layout, machine)
    return {"servers": layout.servers, "hierarchy": hierarchy, "push": compression,
            "step_s": total, "link_s": link_seconds(layout, machine),
            "compute_s": layout.compute_s, "compute_share": layout.compute_s / total}


def _alternatives(cfg, job: JobShape, elements: int, compute: float, cores: int,
                  link_gbps: float) -> list:
    """The model's step time for the layouts docs/scaling.md compares: half or one server
    per node, with or without the node hierarchy, fp32 or bf16 pushes."""
    nodes = len(set(job.node_of))
    rows = []
    for servers in sorted({max(1, nodes // 2), nodes}):
        if servers >= len(job.node_of):
            continue
        for hierarchy in ("none", "node") if nodes > 1 else ("none",):
            for compression in ("none", "bf16"):
                layout = step_layout(cfg, job, elements, compute, cores, servers, hierarchy)
                machine = step_machine(layout, PUSH_BYTES[compression], link_gbps)
                rows.append(_row(layout, machine, hierarchy, compression))
    return rows


def format_plan(result: dict, cfg) -> str:
    job: JobShape = result["job"]
    nodes = len(set(job.node_of))
    lines = [f"{cfg.workload}, {result['params']:,} params | {job.mode}: {len(job.node_of)} ranks "
             f"on {nodes} node(s), {len(job.servers)} server(s), {len(job.workers)} worker(s)"
             f"{', node hierarchy' if job.hierarchy == 'node' else ''} | batch "
             f"{cfg.train.batch_size} x {cfg.model.block_size} tokens per worker, recompute "
             f"{cfg.train.recompute}, device {cfg.device}"]
    if result["note"]:
        lines.append(f"note: {result['note']}")
    lines.append(f"memory per rank (host; {gib(result['baseline'])} of it the Python process "
                 "itself, as measured here):")
    for kind in ("server", "worker"):
        same = [e for e in result["estimates"] if e.kind == kind]
        if not same:
            continue
        top = max(same, key=lambda e: e.total)
        terms = ", ".join(f"{k} {gib(v)}" for k, v in sorted(top.terms.items(),
                                                               key=lambda kv: -kv[1]))
        lines.append(f"  {kind} x{len(same)}: {gib(top.total)} ({terms})")
    if "device_terms" in result:
        dev = result["device_terms"]
        lines.append(f"  on each worker's GPU (fp32 activations): {gib(sum(dev.values()))} ("
                     + ", ".join(f"{k} {gib(v)}" for k, v in dev.items() if v) + ")")
    need = max(result["node_needs"].values())
    here = result["here"]
    fits = "fits" if need <= here.available else "does NOT fit"
    lines.append(f"per node: up to {gib(need)}; a node like this one ({here.describe()}) {fits}")
    if "step" in result:
        s = result["step"]
        lines.append(f"bsp step (docs/scaling.md model): {_describe_row(s)}")
        best = min(result["alternatives"], key=lambda r: r["step_s"])
        if best["step_s"] < 0.95 * s["step_s"]:
            lines.append(f"advice: ps.servers={best['servers']} ps.hierarchy={best['hierarchy']} "
                         f"ps.compression={best['push']}: {_describe_row(best)}")
        local = result["local"]
        if cfg.ps.local_steps:
            row = local[cfg.ps.local_steps]
            lines.append(f"with ps.local_steps={cfg.ps.local_steps}: {1e3 * row['step_s']:.0f} ms "
                         f"per inner step, compute share {100 * row['compute_share']:.0f} %")
        elif best["compute_share"] < 0.5:
            lines.append("advice: the step stays communication-bound (compute "
                         f"{100 * best['compute_share']:.0f} % of it): local steps sync once per "
                         f"H steps (ps.local_steps=50: {1e3 * local[50]['step_s']:.0f} ms per "
                         f"step, compute {100 * local[50]['compute_share']:.0f} %; H=500: "
                         f"{100 * local[500]['compute_share']:.0f} %), or more tokens per worker "
                         "step (a larger train.batch_size)")
    return "\n".join(lines)


def _describe_row(r: dict) -> str:
    return (f"{1e3 * r['step_s']:.0f} ms (compute {1e3 * r['compute_s']:.0f} ms, busiest "
            f"link {1e3 * r['link_s']:.0f} ms, compute share {100 * r['compute_share']:.0f} %)")
