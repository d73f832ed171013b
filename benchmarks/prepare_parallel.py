"""Throughput and peak memory of ``hpcps prepare`` with 1 and N MPI ranks.

Builds a JSON Lines corpus of about ``--size-mb`` MB in a temporary directory: the
built-in corpus (the standard library's modules, one record each) repeated, each
repetition in its own seeded random order. Then, per tokenizer, runs interleaved
pairs of the one-process prepare and ``mpirun -n N python -m mpi4py -m hpcps
prepare`` (MPICH), alternating which goes first, and reports the median input
MB/s of each, the median of the per-pair speed-ups, the CPU seconds of all ranks
(the same work whatever the machine's load), every rank's peak RSS
(``benchmarks/peak_rss.py``), the load average, and whether every corpus was the
same (split digests, split point and tokenizer).

    python benchmarks/prepare_parallel.py --size-mb 300 --tokenizers byte,char,tiktoken
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
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
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the parallel runs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved 1-rank / N-rank pairs, alternating which goes first")
    parser.add_argument("--workdir", default=None, help="where to put the temporary files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        inp = Path(tmp) / "input.jsonl"
        n_bytes = build_jsonl(inp, int(args.size_mb * 1e6))
        for kind in args.tokenizers.split(","):
            runs: dict = {1: [], args.ranks: []}
            prints = set()
            for repeat in range(args.repeats):
                order = (1, args.ranks) if repeat % 2 == 0 else (args.ranks, 1)
                for ranks in order:
                    out = Path(tmp) / f"{kind}-{ranks}.h5"
                    measured = run_prepare(inp, out, kind, ranks, Path(tmp) / "rss")
                    measured["load"] = os.getloadavg()[0]
                    runs[ranks].append(measured)
                    prints.add(fingerprint(out))
                    shutil.rmtree(str(out) + ".parts", ignore_errors=True)
                    out.unlink()
            rates = {r: [n_bytes / 1e6 / m["seconds"] for m in ms] for r, ms in runs.items()}
            rows.append({
                "tokenizer": kind, "input_mb": round(n_bytes / 1e6, 1), "ranks": args.ranks,
                "repeats": args.repeats,
                "mb_per_s_1": round(statistics.median(rates[1]), 2),
                "mb_per_s_n": round(statistics.median(rates[args.ranks]), 2),
                "speedup_median": round(statistics.median(
                    n / one for one, n in zip(rates[1], rates[args.ranks])), 2),
                "cpu_s_1": round(statistics.median(m["cpu_s"] for m in runs[1]), 1),
                "cpu_s_n": round(statistics.median(m["cpu_s"] for m in runs[args.ranks]), 1),
                "peak_rss_mb_1": max(max(m["ranks_rss_mb"]) for m in runs[1]),
                "peak_rss_mb_n": max(max(m["ranks_rss_mb"]) for m in runs[args.ranks]),
                "load_avg": round(statistics.median(m["load"] for ms in runs.values()
                                                    for m in ms), 1),
                "all_equal": len(prints) == 1})
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            n = row["ranks"]
            print(f"{row['tokenizer']:>8}: {row['input_mb']:.0f} MB, 1 rank {row['mb_per_s_1']:.2f} "
                  f"MB/s ({row['cpu_s_1']:.1f} CPU s), {n} ranks {row['mb_per_s_n']:.2f} MB/s "
                  f"({row['cpu_s_n']:.1f} CPU s), median speed-up {row['speedup_median']:.2f}x "
                  f"over {row['repeats']} pairs, peak RSS per rank {row['peak_rss_mb_1']:.0f} / "
                  f"{row['peak_rss_mb_n']:.0f} MB (target <= {TARGET_RSS_MB}), load average "
                  f"{row['load_avg']}, corpora equal: {row['all_equal']}")
    return 0 if all(r["all_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
