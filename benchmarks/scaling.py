"""Measure bsp step times of the synthetic workload over a grid of layouts, fit the cost
model of ``hpcps.bench.cost_model`` to part of them and check its predictions on the
rest (docs/scaling.md).

    python benchmarks/scaling.py --out scaling.json            # measure, fit, check (~5 min on 2 cores)
    python benchmarks/scaling.py --from scaling.json           # fit and check saved runs
    python benchmarks/scaling.py --from scaling.json --cluster # ... and predict a cluster

Each point is one ``mpirun`` job of ``hpcps train workload=synthetic`` (bsp, 1 + warm-up
steps not timed), the median step time of the lead worker. ``path`` is ``shm`` (one node,
shared memory) or ``net`` (MPICH with ``MPIR_CVAR_NOLOCAL=1``: every rank its own node, all
one-sided traffic through the network module). Every third point (in grid order) is held
out of the fit and used to check the predictions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hpcps.bench.cost_model import (
    CLUSTER,
    Layout,
    Machine,
    cluster_machine,
    fit,
    link_seconds,
    measure_update,
    predict_local_step_s,
    predict_step_s,
)

# (workers, servers, elements, compute ms, path): 3..34 ranks on 2 cores
GRID = [(w, s, p, c, path)
        for path in ("shm", "net")
        for (w, s) in ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 2), (30, 2), (16, 4))
        for p in (250_000, 1_000_000)
        for c in (20.0,)]


def measure(point, steps: int, warmup: int, root: Path) -> float:
    workers, servers, elements, compute_ms, path = point
    out = root / f"w{workers}_s{servers}_p{elements}_{path}"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    if path == "net":
        env["MPIR_CVAR_NOLOCAL"] = "1"
    cmd = ["mpirun", "-n", str(workers + servers), sys.executable, "-m", "mpi4py", "-m", "hpcps",
           "-q", "train", "workload=synthetic", "ps.mode=bsp", f"ps.servers={servers}",
           f"synthetic.n_params={elements}", f"synthetic.compute_ms={compute_ms}",
           "train.batch_size=1", f"train.max_steps={warmup + steps}", "train.eval_every=0",
           "train.peak_flops=1e9", "checkpoint.every=0", f"out_dir={out}"]
    subprocess.run(cmd, env=env, check=True, timeout=900, capture_output=True)
    with open(out / "metrics.jsonl", encoding="utf-8") as fh:
        records = [json.loads(x) for x in fh if x.strip()]
    return statistics.median(r["step_s"] for r in records if r["step"] > warmup)


# Local steps add the worker's own AdamW update every inner step: ~28 bytes of HBM traffic per
# element (params, grad, m, v read; params, m, v written) at an assumed 2 TB/s ~ 1.7 ms; int4
# deltas push 0.5625 bytes per element (4 bits + an fp32 scale per 64), pulls stay fp32.
INNER_UPDATE_S = CLUSTER["elements"] * 28 / 2e12
INT4_BYTES = 0.5625


def cluster_table(fitted: Machine) -> None:
    """Predicted step time on ``CLUSTER`` with this machine's fitted server CPU costs.

    Several server shards on one node share its link, so bytes per link do not drop below
    one shard per node: the rows have S = nodes / 2 and S = nodes and vary the hierarchy
    and the push encoding (bf16 halves the bytes pushed, pulls stay fp32)."""
    c = CLUSTER
    workers = c["nodes"] * c["gpus_per_node"]
    print(f"cluster: {c['nodes']} nodes x {c['gpus_per_node']} GPUs, P = {c['elements']:,}, "
          f"compute {1e3 * c['compute_s']:.0f} ms, {8 * c['link_bytes_per_s'] / 1e9:.0f} Gb/s")
    for servers in (c["nodes"] // 2, c["nodes"]):
        for hierarchy in (False, True):
            for push_bytes in (4, 2):
                m = cluster_machine(fitted, push_bytes)
                layout = Layout(workers=workers, servers=servers, nodes=c["nodes"],
                                elements=c["elements"], compute_s=c["compute_s"], path="ib",
                                cores=64, hierarchy=hierarchy)
                total = predict_step_s(layout, m)
                link = link_seconds(layout, m)
                print(f"  servers={servers:3d} hierarchy={'node' if hierarchy else 'none':4s} "
                      f"push={'bf16' if push_bytes == 2 else 'fp32'}: step {1e3 * total:5.0f} ms, "
                      f"busiest link {1e3 * link:4.0f} ms, compute share "
                      f"{100 * c['compute_s'] / total:3.0f} %")
    print(f"local steps (ps.local_steps = H; + {1e3 * INNER_UPDATE_S:.1f} ms of inner AdamW per "
          "step), servers = nodes:")
    for hierarchy in (False, True):
        for push, push_bytes in (("fp32", 4.0), ("int4", INT4_BYTES)):
            m = cluster_machine(fitted, push_bytes)
            layout = Layout(workers=workers, servers=c["nodes"], nodes=c["nodes"],
                            elements=c["elements"], compute_s=c["compute_s"], path="ib",
                            cores=64, hierarchy=hierarchy)
            cells = []
            for h in (20, 50, 100, 500):
                t = predict_local_step_s(layout, m, h, INNER_UPDATE_S)
                cells.append(f"H={h}: {1e3 * t:5.1f} ms ({100 * c['compute_s'] / t:3.0f} %)")
            print(f"  hierarchy={'node' if hierarchy else 'none':4s} push={push}: "
                  + " | ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="save the measured points here (JSON)")
    parser.add_argument("--from", dest="source", help="use the points saved in this file")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes over the grid (interleaved); each point's median is used")
    parser.add_argument("--cluster", action="store_true",
                        help="also print the model's prediction for the cluster in CLUSTER")
    args = parser.parse_args()
    if args.source:
        points = json.loads(Path(args.source).read_text())["points"]
    else:
        samples: dict = {point: [] for point in GRID}
        with tempfile.TemporaryDirectory(prefix="hpcps-scaling-") as tmp:
            for _ in range(args.repeats):
                for point in GRID:
                    samples[point].append(measure(point, args.steps, args.warmup, Path(tmp)))
                    print(json.dumps({"point": point, "step_s": samples[point][-1]}), flush=True)
        points = [{"workers": w, "servers": s, "elements": p, "compute_ms": c, "path": path,
                   "step_s": statistics.median(samples[(w, s, p, c, path)]),
                   "samples": samples[(w, s, p, c, path)]} for (w, s, p, c, path) in GRID]
        if args.out:
            Path(args.out).write_text(json.dumps({"points": points}, indent=1))
    # NOLOCAL makes every rank its own MPI node, but all of them share this machine's cores
    cores = os.cpu_count() or 1
    layouts = [Layout(workers=p["workers"], servers=p["servers"], nodes=1, elements=p["elements"],
                      compute_s=p["compute_ms"] / 1e3, path=p["path"], cores=cores) for p in points]
    measured = [p["step_s"] for p in points]
    train = [i for i in range(len(points)) if i % 3 != 2]
    update = measure_update()
    print(f"AdamW update on this CPU: {1e9 * update:.2f} ns per element (measured on its own)")
    machine = fit([layouts[i] for i in train], [measured[i] for i in train], update=update)
    print(json.dumps({"fitted": machine.as_dict()}, indent=1))
    worst = 0.0
    for i, (layout, seconds) in enumerate(zip(layouts, measured)):
        predicted = predict_step_s(layout, machine)
        error = predicted / seconds - 1.0
        worst = max(worst, abs(error)) if i % 3 == 2 else worst
        print(f"{'check' if i % 3 == 2 else 'fit  '} W={layout.workers:2d} S={layout.servers} "
              f"P={layout.elements:>9,} {layout.path}: measured {1e3 * seconds:7.1f} ms, "
              f"model {1e3 * predicted:7.1f} ms ({100 * error:+.0f}%)")
    print(f"worst error on the held-out points: {100 * worst:.1f}%")
    if args.cluster:
        cluster_table(machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
