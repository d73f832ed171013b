"""hpcps train: run a training job (one process, or every rank of an mpirun)."""

NAME = "train"
HELP = "train a model from a TOML config (single process or under mpirun/srun)"
EXAMPLE = ("mpirun -n 4 python -m mpi4py -m hpcps train configs/shakespeare_char.toml "
           "ps.mode=ssp ps.staleness=2 train.max_steps=500")


def add_arguments(parser):
    parser.add_argument("config", help="TOML config file, or the name of one in configs/ "
                        "(default, shakespeare_char, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="override config keys, e.g. train.lr=3e-4 ps.mode=asp")


def run(args):
    from hpcps.cli._configs import resolve_config_path
    from hpcps.train.run import train_main
    return train_main(resolve_config_path(args.config), args.overrides, quiet=args.quiet)
