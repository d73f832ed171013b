"""hpcps bench: benchmarks that print ratios measured side by side in one run."""

import importlib

from hpcps.cli import OneLineParser

NAME = "bench"
HELP = "benchmarks: model (vs PyTorch), ps (RMA bandwidth vs raw mpi4py), train (modes)"
EXAMPLE = "hpcps bench model --repeats 5   |   mpirun -n 2 python -m mpi4py -m hpcps bench ps"

SUITES = {
    "model": ("hpcps.bench.model", "forward+backward+update tokens/s, ratio to PyTorch eager"),
    "ps": ("hpcps.bench.ps", "push/pull bandwidth through the PS windows vs raw mpi4py RMA"),
    "train": ("hpcps.bench.train", "bsp/ssp/asp/allreduce throughput and PS overhead"),
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="suite", metavar="SUITE", parser_class=OneLineParser)
    sub.required = True
    for name, (module, help_text) in SUITES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        mod.add_arguments(p)
        p.set_defaults(_suite_module=module)


def run(args):
    mod = importlib.import_module(args._suite_module)
    return mod.run(args)
