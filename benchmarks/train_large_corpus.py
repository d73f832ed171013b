"""Training on a corpus several times larger than the memory a worker may use.

Builds a JSON Lines corpus of about ``--size-mb`` MB (the built-in corpus repeated in
shuffled orders, see ``prepare_parallel.py``), prepares it with the byte tokenizer on
2 ranks (part files + virtual datasets, uint16: twice the text size on disk), then
trains a small GPT with ``mpirun -n 3`` (bsp: 2 workers, 1 server) and
``data.in_memory_mb`` below the split size, every rank's address space capped at
``--limit-as-mb`` (``RLIMIT_AS``). Reports the corpus size, each rank's peak RSS,
tokens/s and the losses. The control run asks one process to load the train split
into memory under the same cap: it must fail with the one-line "does not fit" error.

    python benchmarks/train_large_corpus.py --size-mb 1500 --limit-as-mb 600 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import read_reports
from prepare_parallel import build_jsonl, mpirun

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS = Path(__file__).resolve().parent / "peak_rss.py"
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=128",
         "train.batch_size=12", "train.eval_steps=10", "train.log_every=50",
         "train.peak_flops=1e12", "checkpoint.every=0"]


def disk_mb(corpus: Path) -> float:
    parts = Path(str(corpus) + ".parts")
    files = [corpus, *(parts.iterdir() if parts.is_dir() else [])]
    return sum(f.stat().st_size for f in files) / 1e6


def run(cmd: list, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1500, help="JSON Lines input in MB")
    parser.add_argument("--corpus", default=None, help="use this prepared corpus instead")
    parser.add_argument("--limit-as-mb", type=float, default=600, help="address space per rank")
    parser.add_argument("--in-memory-mb", type=int, default=64, help="data.in_memory_mb")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        corpus = Path(args.corpus) if args.corpus else tmp / "corpus.h5"
        if not args.corpus:
            build_jsonl(tmp / "input.jsonl", int(args.size_mb * 1e6), seed=1)
            proc = run([mpirun(), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "hpcps",
                        "prepare", str(tmp / "input.jsonl"), "-o", str(corpus), "-q",
                        "--tokenizer", "byte"], env)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            (tmp / "input.jsonl").unlink()
        rss = tmp / "rss"
        wrapped = [sys.executable, str(PEAK_RSS), "--limit-as-mb", str(args.limit_as_mb), str(rss)]
        cmd = [mpirun(), "-n", "3", *wrapped, "-m", "mpi4py", "-m", "hpcps", "train",
               f"data.path={corpus}", f"out_dir={tmp / 'run'}",
               f"data.in_memory_mb={args.in_memory_mb}", "ps.mode=bsp",
               f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", *MODEL]
        started = time.perf_counter()
        proc = run(cmd, env)
        seconds = time.perf_counter() - started
        if proc.returncode:
            raise SystemExit(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        roles = next((line for line in proc.stdout.splitlines() if "server(s)" in line), "")
        with open(tmp / "run" / "metrics.jsonl", encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        control = run([*wrapped[:2], *wrapped[2:4], str(tmp / "rss-control"), "-m", "hpcps",
                       "train", f"data.path={corpus}", f"out_dir={tmp / 'control'}",
                       "data.in_memory_mb=1000000", "train.max_steps=2", *MODEL], env)
        from hpcps.data.corpus import Corpus
        with Corpus.open(str(corpus)) as c:
            train_mb = c.split("train").n_tokens * c.token_dtype.itemsize / 1e6
        result = {"corpus_mb_on_disk": round(disk_mb(corpus), 1), "train_split_mb": round(train_mb, 1),
                  "limit_as_mb": args.limit_as_mb, "in_memory_mb": args.in_memory_mb,
                  "roles": roles.split("|")[0].strip(),
                  "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in read_reports(str(rss))],
                  "steps": args.steps, "seconds": round(seconds, 1),
                  "tokens_per_s_last": round(records[-1]["tokens_per_s"]),
                  "loss_first": round(records[0]["loss"], 3), "loss_last": round(records[-1]["loss"], 3),
                  "val_loss": round(records[-1].get("val_loss") or float("nan"), 3),
                  "control_exit": control.returncode,
                  "control_error": control.stderr.strip().splitlines()[-1] if control.stderr else ""}
        if not args.corpus:
            shutil.rmtree(str(corpus) + ".parts", ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0 if result["control_exit"] == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
