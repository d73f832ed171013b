"""``hpcps metrics``: a run's per-step metrics as CSV."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hpcps.errors import UserError
from hpcps.metrics.runlog import read_metrics, write_metrics_csv
from hpcps.runtime.files import check_writable
from hpcps.runtime.mpi import say

NAME = "metrics"
HELP = ("Export a run's metrics.jsonl as CSV: one row per step (the last record of a "
        "resumed step wins), one column per key, step first, lists JSON-encoded.")
EXAMPLE = "hpcps metrics runs/bsp -o bsp.csv"


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("-o", "--output", metavar="FILE", help="CSV file to write (default: stdout)")


def run(args) -> int:
    if args.output is not None:
        check_writable(args.output)
    records = read_metrics(args.run_dir, warn=lambda message: say(f"hpcps: warning: {message}"))
    if not records:
        raise UserError(f"{Path(args.run_dir) / 'metrics.jsonl'} has no records")
    if args.output is None:
        try:
            write_metrics_csv(records, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader (e.g. `head`) stopped early: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UserError(f"output directory {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"output {out} is a directory")
    tmp = out.with_name(f".{out.name}.tmp.{os.getpid()}")   # a reader never sees half a file
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            columns = write_metrics_csv(records, fh)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if not getattr(args, "quiet", False):
        print(f"wrote {out}: {len(records)} steps, {len(columns)} columns", file=sys.stderr)
    return 0
