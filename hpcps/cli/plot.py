"""``hpcps plot``: training curves of one or more runs in one figure."""

from __future__ import annotations

from hpcps.errors import UserError
from hpcps.metrics.plot import plot_runs
from hpcps.runtime.mpi import say

NAME = "plot"
HELP = ("Plot loss vs step and wall time, throughput and push staleness of one or more "
        "run directories into one image (needs matplotlib).")
EXAMPLE = "hpcps plot runs/bsp runs/asp -o compare.png --labels bsp,asp"


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories holding metrics.jsonl (and config.toml)")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="image to write (.png, .pdf, .svg)")
    parser.add_argument("--labels", metavar="A,B,...",
                        help="legend labels, one per run (default: 'DIR_NAME (ps mode)')")


def run(args) -> int:
    labels = None
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
        if len(labels) != len(args.run_dirs):
            raise UserError(f"--labels has {len(labels)} names for {len(args.run_dirs)} "
                            "run directories")
    series = plot_runs(args.run_dirs, args.output, labels=labels,
                       warn=lambda message: say(f"hpcps: warning: {message}"))
    runs = len(args.run_dirs)
    print(f"wrote {args.output}: {series} series from {runs} run{'s' if runs > 1 else ''}")
    return 0
