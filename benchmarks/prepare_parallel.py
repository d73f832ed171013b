"""Throughput and peak memory of ``hpcps prepare`` with 1 and N MPI ranks.

Builds a JSON Lines corpus of about ``--size-mb`` MB in a temporary directory: the
built-in corpus (the standard library's modules, one record each) repeated, each
repetition in its own seeded random order. Then, per tokenizer, runs the
one-process prepare and ``mpirun -n N python -m mpi4py -m hpcps prepare`` (MPICH),
and reports input MB/s, the CPU seconds of all ranks, the machine's load average
after the run, every rank's peak RSS (``benchmarks/peak_rss.py``) and
whether the parallel corpus equals the one-process corpus (split digests, split
point and the tokenizer).

    python benchmarks/prepare_parallel.py --size-mb 500 --tokenizers byte,tiktoken --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_rss import read_reports

REPO = Path(__file__).resolve().parents[1]
PEAK_RSS = Path(__file__).resolve().parent / "peak_rss.py"
TOKENIZER_ARGS = {"char": ["--tokenizer", "char"], "byte": ["--tokenizer", "byte"],
                  "bpe": ["--tokenizer", "bpe"], "tiktoken": ["--tiktoken", "cl100k_base"]}
TARGET_RSS_MB = 500


def build_jsonl(path: Path, size_bytes: int, seed: int = 0) -> int:
    """The built-in corpus repeated in shuffled orders until ``size_bytes``; returns the size."""
    from hpcps.data.default_corpus import default_corpus_files
    lines = [json.dumps({"text": p.read_text(encoding="utf-8"), "id": p.name}) + "\n"
             for p in default_corpus_files()]
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            rng.shuffle(lines)
            for line in lines:
                fh.write(line)
                written += len(line.encode("utf-8"))
    return written


def mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def run_prepare(inp: Path, out: Path, tokenizer: str, ranks: int, rss_dir: Path) -> dict:
    """One prepare under the RSS wrapper: seconds and the peak RSS of every rank."""
    shutil.rmtree(rss_dir, ignore_errors=True)
    program = [str(PEAK_RSS), str(rss_dir)]
    args = ["hpcps", "prepare", str(inp), "-o", str(out), "--overwrite", "-q",
            *TOKENIZER_ARGS[tokenizer]]
    if ranks == 1:
        cmd = [sys.executable, *program, "-m", *args]
    else:
        cmd = [mpirun(), "-n", str(ranks), sys.executable, *program, "-m", "mpi4py", "-m", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cpu_before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "cpu_s": _children_cpu() - cpu_before,
            "ranks_rss_mb": [r["peak_rss_mb"] for r in read_reports(rss_dir)]}


def _children_cpu() -> float:
    """User + system CPU seconds of all finished descendants (mpirun reaps its ranks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fingerprint(path: Path) -> tuple:
    from hpcps.data.corpus import Corpus
    with Corpus.open(str(path)) as corpus:
        return (corpus.attrs["tokenizer"], corpus.attrs["split_token"],
                corpus.split("train").attrs["sha256"], corpus.split("val").attrs["sha256"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=500, help="input size in MB (1e6 B)")
    parser.add_argument("--tokenizers", default="byte,tiktoken", help="comma-separated: "
                        + ", ".join(TOKENIZER_ARGS))
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    parser.add_argument("--workdir", default=None, help="where to put the temporary files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        inp = Path(tmp) / "input.jsonl"
        n_bytes = build_jsonl(inp, int(args.size_mb * 1e6))
        for kind in args.tokenizers.split(","):
            reference = None
            for ranks in map(int, args.ranks.split(",")):
                out = Path(tmp) / f"{kind}-{ranks}.h5"
                measured = run_prepare(inp, out, kind, ranks, Path(tmp) / "rss")
                same = fingerprint(out)
                reference = reference or same
                rows.append({"tokenizer": kind, "ranks": ranks, "input_mb": round(n_bytes / 1e6, 1),
                             "seconds": round(measured["seconds"], 1),
                             "cpu_s": round(measured["cpu_s"], 1),
                             "load_avg_1min": round(os.getloadavg()[0], 1),
                             "mb_per_s": round(n_bytes / 1e6 / measured["seconds"], 2),
                             "peak_rss_mb_per_rank": measured["ranks_rss_mb"],
                             "equals_first": same == reference})
                shutil.rmtree(str(out) + ".parts", ignore_errors=True)
                out.unlink()
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            worst = max(row["peak_rss_mb_per_rank"])
            print(f"{row['tokenizer']:>8} x{row['ranks']}: {row['input_mb']:.0f} MB in "
                  f"{row['seconds']:.1f} s ({row['mb_per_s']:.2f} MB/s, {row['cpu_s']:.1f} CPU s, "
                  f"load {row['load_avg_1min']}), peak RSS per rank "
                  f"{row['peak_rss_mb_per_rank']} MB (target <= {TARGET_RSS_MB}: "
                  f"{'ok' if worst <= TARGET_RSS_MB else 'OVER'}), equals the first run: "
                  f"{row['equals_first']}")
    return 0 if all(r["equals_first"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
