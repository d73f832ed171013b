"""Peak memory and throughput of ``hpcps prepare`` on a large text input.

Builds a text file of about ``--size-mb`` MB (tinyshakespeare repeated; the
built-in stdlib corpus if that file is absent) in a temporary directory, runs
``python -m hpcps prepare`` in a subprocess per tokenizer and reports the
child's peak RSS (``ru_maxrss`` from ``os.wait4``, i.e. the RUSAGE_CHILDREN
figure of that one child) and the input MB/s. The target is a peak under
500 MB for 1 GB of text with the char and byte tokenizers.

    python benchmarks/prepare_memory.py                       # 1 GB, char + byte
    python benchmarks/prepare_memory.py --size-mb 100 --tokenizers bpe
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
TARGET_MB = 500


def seed_bytes() -> tuple[bytes, str]:
    if SEED_TEXT.is_file():
        return SEED_TEXT.read_bytes(), "tinyshakespeare"
    from hpcps.data.default_corpus import default_corpus_files
    return b"".join(p.read_bytes() for p in default_corpus_files()), "stdlib corpus"


def write_input(path: Path, size_bytes: int) -> int:
    seed, _ = seed_bytes()
    written = 0
    with open(path, "wb") as fh:
        while written < size_bytes:
            fh.write(seed)
            written += len(seed)
    return written


def run_measured(cmd: list) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in MB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, seconds, usage.ru_maxrss * scale / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1000, help="input size in MB (1e6 B)")
    parser.add_argument("--tokenizers", default="char,byte", help="comma-separated list")
    parser.add_argument("--workdir", default=None, help="where to put the temporary files")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        text = Path(tmp) / "input.txt"
        n_bytes = write_input(text, int(args.size_mb * 1e6))
        base_cmd = [sys.executable, "-c", "import h5py, numpy, hpcps.data.prepare"]
        _, _, baseline = run_measured(base_cmd)
        for kind in args.tokenizers.split(","):
            out = Path(tmp) / f"corpus-{kind}.h5"
            cmd = [sys.executable, "-m", "hpcps", "prepare", str(text), "-o", str(out),
                   "--tokenizer", kind, "--quiet"]
            code, seconds, peak = run_measured(cmd)
            results.append({"tokenizer": kind, "input_mb": round(n_bytes / 1e6, 1),
                            "exit_code": code, "seconds": round(seconds, 1),
                            "mb_per_s": round(n_bytes / 1e6 / seconds, 1),
                            "peak_rss_mb": round(peak, 1),
                            "import_baseline_rss_mb": round(baseline, 1),
                            "under_target": code == 0 and peak < TARGET_MB})
            out.unlink(missing_ok=True)
    for row in results:
        if args.json:
            print(json.dumps(row))
        else:
            status = "ok" if row["under_target"] else "OVER TARGET/FAILED"
            print(f"{row['tokenizer']:>5}: {row['input_mb']:.0f} MB in {row['seconds']:.1f} s "
                  f"({row['mb_per_s']:.1f} MB/s), peak RSS {row['peak_rss_mb']:.0f} MB "
                  f"(imports alone {row['import_baseline_rss_mb']:.0f} MB; target < {TARGET_MB} "
                  f"MB: {status}), exit {row['exit_code']}")
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
