"""A large model through the parameter server equals one process, step by step.

Trains CONFIG for a few steps with bsp (1 server + W workers, batch b each) and then in one
process with batch W * b, on the same corpus, and prints one JSON object: each run's
per-step losses and gradient norms, the largest relative difference, and every rank's
peak resident memory (``benchmarks/peak_rss.py``). The runs follow each other, so the
node only has to hold one of them::

    python benchmarks/large_bsp_equality.py configs/gpt2_355m.toml --corpus data/bpe.h5 \\
        --workers 2 --batch 1 --steps 3 train.recompute=block

Overrides after the options go to both runs (``key=value``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def train(command: list[str], run_dir: str, rss_dir: str) -> tuple[list[dict], float, list]:
    """Run one training command; returns its metrics, wall seconds and peak RSS per rank."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"large_bsp_equality: {' '.join(command[:6])} ... exited {done.returncode}:\n"
                 f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        metrics = [json.loads(line) for line in fh if line.strip()]
    peaks = []
    for path in sorted(glob.glob(os.path.join(rss_dir, "rss-*.json"))):
        with open(path, encoding="utf-8") as fh:
            peaks.append(json.load(fh))
    return metrics, seconds, sorted(peaks, key=lambda p: p.get("rank", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="sequences per worker")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    common = [f"data.path={args.corpus}", "device=cpu", f"train.max_steps={args.steps}",
              "train.eval_every=0", "train.eval_steps=1", "train.log_every=1",
              "checkpoint.background=false", "train.warmup_steps=1", *args.overrides]
    peak_rss = [sys.executable, os.path.join(HERE, "peak_rss.py")]
    report = {"config": args.config, "workers": args.workers, "batch": args.batch,
              "steps": args.steps, "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name in ("bsp", "single"):
            run_dir, rss_dir = os.path.join(tmp, name), os.path.join(tmp, name + "-rss")
            os.makedirs(rss_dir)
            hpcps = ["-m", "mpi4py", "-m", "hpcps", "-q", "train", args.config, *common,
                     f"out_dir={run_dir}"]
            if name == "bsp":
                command = [args.mpirun, "-n", str(args.workers + 1), *peak_rss, rss_dir, *hpcps,
                           "ps.mode=bsp", "ps.servers=1", f"train.batch_size={args.batch}"]
            else:
                command = [*peak_rss, rss_dir, *hpcps, "ps.mode=single",
                           f"train.batch_size={args.batch * args.workers}"]
            metrics, seconds, peaks = train(command, run_dir, rss_dir)
            steps = [r for r in metrics if "loss" in r]
            runs[name] = steps
            report[name] = {"seconds": round(seconds, 1),
                            "loss": [r["loss"] for r in steps],
                            "grad_norm": [r["grad_norm"] for r in steps],
                            "peak_rss_mib": [round(p["peak_rss_mb"]) for p in peaks]}
    rel = [abs(a[key] - b[key]) / abs(b[key])
           for a, b in zip(runs["bsp"], runs["single"]) for key in ("loss", "grad_norm")]
    report["max_rel_diff"] = max(rel) if rel else None
    report["equal_within_1e-5"] = bool(rel) and len(runs["bsp"]) == len(runs["single"]) \
        and max(rel) <= 1e-5
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
