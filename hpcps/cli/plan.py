"""hpcps plan: memory per rank and the bsp step time of a job layout, without starting it."""

from hpcps.bench.plan import format_plan, plan
from hpcps.config import load_config

NAME = "plan"
HELP = ("estimate a job's memory per rank (against this node's) and its bsp step time "
        "(docs/scaling.md) for a number of ranks and nodes, without starting it")
EXAMPLE = "hpcps plan configs/gpt2_124m.toml --ranks 320 --nodes 64 train.batch_size=16"


def add_arguments(parser):
    parser.add_argument("config", help="TOML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--ranks", type=int, required=True, help="MPI ranks of the job")
    parser.add_argument("--nodes", type=int, default=1, help="nodes they run on (default 1)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary when the config's corpus is not here (default 50257)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="a worker's peak FLOP/s (default: train.peak_flops, else 312e12 "
                             "on a GPU, 125e9 on a CPU core)")
    parser.add_argument("--mfu", type=float, default=0.4,
                        help="share of the peak a worker's forward + backward reaches (0.4)")
    parser.add_argument("--link-gbps", type=float, default=100.0,
                        help="a node's network link in Gb/s (default 100)")
    parser.add_argument("--cores", type=int, default=None,
                        help="cores per node (default: this machine's on one node, else 64)")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    result = plan(cfg, args.ranks, args.nodes, vocab_size=args.vocab_size,
                  peak_flops=args.peak_flops, mfu=args.mfu, link_gbps=args.link_gbps,
                  cores=args.cores)
    print(format_plan(result, cfg))
    return 0
