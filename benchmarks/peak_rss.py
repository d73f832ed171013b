"""Run a Python program (``-m module`` or a script) and, when it exits, write this
process's peak resident set size (``VmHWM``) to ``DIR/rss-<pid>.json`` together with
its MPI rank (from the launcher's environment). Used by the benchmarks to measure
every rank of an ``mpirun`` job, which ``wait4`` on ``mpirun`` cannot see:

    mpirun -n 2 python benchmarks/peak_rss.py DIR -m mpi4py -m hpcps prepare ...

``--limit-as-mb N`` first caps the process's address space (``RLIMIT_AS``) at N MiB:
an allocation beyond it fails, so the run shows what fits in that memory.
"""

from __future__ import annotations

import atexit
import json
import os
import resource
import runpy
import sys

RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def launcher_rank() -> int:
    for name in RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    return 0


def main() -> None:
    args = sys.argv[1:]
    if args[0] == "--limit-as-mb":
        limit = int(float(args[1]) * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        args = args[2:]
    out_dir, args = args[0], args[1:]
    os.makedirs(out_dir, exist_ok=True)

    def report() -> None:
        path = os.path.join(out_dir, f"rss-{os.getpid()}.json")
        with open(path, "w", encoding="utf-8") as fh:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            json.dump({"rank": launcher_rank(), "peak_rss_mb": round(peak_rss_mb(), 1),
                       "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}, fh)

    atexit.register(report)
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


def read_reports(out_dir: str) -> list:
    """The reports of one run, by rank."""
    rows = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("rss-"):
            with open(os.path.join(out_dir, name), encoding="utf-8") as fh:
                rows.append(json.load(fh))
    return sorted(rows, key=lambda r: r["rank"])


if __name__ == "__main__":
    main()
