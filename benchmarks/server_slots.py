"""Server memory and bsp step time against ``ps.slots`` (docs/memory.md).

For each worker count W and slot count k, runs the synthetic workload in bsp (2 server
shards by default) and reads the run's ``memory.json`` (every rank's measured peak RSS
beside its estimate) and ``metrics.jsonl`` (wall time per step). Settings run
interleaved, repeat after repeat, and the report gives medians; ratios are taken
within a repeat (same minute of a shared machine)::

    python benchmarks/server_slots.py --params 20000000 --workers 2,6 --slots 2,all \\
        --steps 12 --repeats 3 --compute-ms 100

``all`` is one slot per worker. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_once(args, workers: int, slots, out: str) -> dict:
    """One job; returns the servers' peak and estimate (MiB) and the median step seconds."""
    k = workers if slots == "all" else int(slots)
    command = [args.mpirun, "-n", str(workers + args.servers), sys.executable, "-m", "mpi4py",
               "-m", "hpcps", "-q", "train", "workload=synthetic",
               f"synthetic.n_params={args.params}", f"synthetic.compute_ms={args.compute_ms}",
               "ps.mode=bsp", f"ps.servers={args.servers}", f"ps.slots={k}",
               f"train.max_steps={args.steps}", "train.eval_every=0", "checkpoint.every=0",
               f"out_dir={out}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"server_slots: W={workers} k={k} exited {done.returncode}:\n"
                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(os.path.join(out, "memory.json"), encoding="utf-8") as fh:
        ranks = json.load(fh)["ranks"].values()
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    servers = [r for r in ranks if r["kind"] == "server"]
    steps = [r["step_s"] for r in records[args.warmup:]]
    return {"server_peak_mib": max(r["peak_bytes"] for r in servers) / 2**20,
            "server_estimate_mib": max(r["estimate_bytes"] for r in servers) / 2**20,
            "step_s": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=20_000_000)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--workers", default="2,6")
    parser.add_argument("--slots", default="2,all", help="slot counts, 'all' = one per worker")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compute-ms", type=float, default=100.0,
                        help="synthetic forward/backward time per step")
    parser.add_argument("--mpirun", default="mpirun")
    args = parser.parse_args()
    settings = [(int(w), s) for w in args.workers.split(",") for s in args.slots.split(",")]
    rows: dict = {f"W{w}/k{s}": [] for w, s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            order = settings if rep % 2 == 0 else settings[::-1]
            for w, s in order:
                rows[f"W{w}/k{s}"].append(run_once(args, w, s, os.path.join(tmp, f"{rep}-{w}-{s}")))
    report = {"params": args.params, "servers": args.servers, "steps": args.steps,
              "compute_ms": args.compute_ms, "repeats": args.repeats, "results": {}}
    for name, runs in rows.items():
        report["results"][name] = {key: round(statistics.median(r[key] for r in runs), 4)
                                   for key in runs[0]}
    # per-repeat ratios of each k against one slot per worker at the same W
    for w, s in settings:
        if s != "all" and f"W{w}/kall" in rows:
            ratios = [a["step_s"] / b["step_s"]
                      for a, b in zip(rows[f"W{w}/k{s}"], rows[f"W{w}/kall"])]
            report["results"][f"W{w}/k{s}"]["step_vs_all"] = round(statistics.median(ratios), 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
