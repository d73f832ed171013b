"""Push / pull bandwidth through the parameter-server windows vs raw mpi4py RMA, and
per-worker push slots vs one Accumulate(SUM) buffer. The same as ``hpcps bench ps``:

    mpirun -n 2 python -m mpi4py benchmarks/ps_bandwidth.py
    mpirun -n 4 python -m mpi4py benchmarks/ps_bandwidth.py --servers 1 --sizes 1M,16M --json

See hpcps/bench/ps.py for what is timed and docs/benchmarks.md for measured numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from hpcps.bench import ps  # noqa: E402
from hpcps.cli import _finalize_mpi, report_user_error  # noqa: E402
from hpcps.errors import EXIT_USAGE, UserError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ps.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code = ps.run(args)
    except UserError as err:
        if getattr(err, "agreed_rank", 0) == 0:
            report_user_error(err)
        code = EXIT_USAGE
    _finalize_mpi()
    return code


if __name__ == "__main__":
    sys.exit(main())
