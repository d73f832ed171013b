"""hpcps train: run a training job (one process, or every rank of an mpirun)."""

from hpcps.config.paths import resolve_config_path
from hpcps.train.run import train_main

NAME = "train"
HELP = "train a model from a TOML config (single process or under mpirun/srun)"
EXAMPLE = ("mpirun -n 4 python -m mpi4py -m hpcps train configs/shakespeare_char.toml "
           "ps.mode=ssp ps.staleness=2 train.max_steps=500")


def add_arguments(parser):
    parser.add_argument("config", help="TOML config file, or the name of one in configs/ "
                        "(default, shakespeare_char, ...); omit it to start from the built-in "
                        "defaults and give only key=value overrides")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. train.lr=3e-4 ps.mode=asp")


def run(args):
    config, overrides = args.config, list(args.overrides)
    if "=" in config and not config.endswith(".toml"):
        config, overrides = None, [config] + overrides
    return train_main(resolve_config_path(config) if config else None, overrides,
                      quiet=args.quiet)
