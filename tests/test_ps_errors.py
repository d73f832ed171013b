"""Bad parameter-server input under mpirun: every rank exits 2 within seconds, rank 0
prints exactly one line naming the problem, nobody prints a traceback."""

import re
import sys

import pytest
from mpi_util import describe, mpi_env, mpirun_prefix, run_command

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(60)]

# runs hpcps' own entry point and reports each rank's exit code on stdout (rank ids come
# from the launcher's environment, because MPI is finalized by then)
RANK_EXIT = """\
import os, sys
from hpcps.cli import main
code = main(sys.argv[1:])
rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
print(f"rank {rank} exit {code}", flush=True)
sys.exit(code)
"""

BASE = ["train", "workload=synthetic", "synthetic.n_params=101", "train.max_steps=3",
        "train.eval_every=0", "train.peak_flops=1e9"]

CASES = {
    # id: (ranks, overrides, expected message fragment)
    "servers_equal_ranks": (3, ["ps.mode=asp", "ps.servers=3"],
                            "ps.servers = 3 leaves no worker in a job of 3 ranks"),
    "servers_above_ranks": (2, ["ps.mode=bsp", "ps.servers=5"],
                            "ps.servers = 5 leaves no worker in a job of 2 ranks"),
    "servers_zero": (3, ["ps.mode=bsp", "ps.servers=0"], "'ps.servers': must be >= 1, got 0"),
    "one_rank_bsp": (1, ["ps.mode=bsp"], "ps.mode = bsp needs at least 2 ranks"),
    "one_rank_asp": (1, ["ps.mode=asp"], "ps.mode = asp needs at least 2 ranks"),
    "negative_staleness": (3, ["ps.mode=ssp", "ps.staleness=-1"],
                           "'ps.staleness': must be >= 0, got -1"),
    "topk_ratio_zero": (3, ["ps.compression=topk", "ps.topk_ratio=0"],
                        "'ps.topk_ratio': must be > 0"),
    "topk_ratio_above_one": (3, ["ps.compression=topk", "ps.topk_ratio=1.5"],
                             "'ps.topk_ratio': must be <= 1, got 1.5"),
    "unknown_mode": (3, ["ps.mode=aps"], "'ps.mode': 'aps' is not one of"),
    "unknown_compression": (3, ["ps.compression=zip"], "'ps.compression': 'zip' is not one of"),
    "single_with_ranks": (2, ["ps.mode=single"], "ps.mode = single runs one process"),
    # fewer receive slots than pushers only where a bsp step's pushes can take turns
    "slots_asp": (4, ["ps.mode=asp", "ps.slots=2"],
                  "ps.slots = 2 is fewer than the 3 pushers, which needs bsp without backup "
                  "workers (ps.mode = asp applies each push on its own)"),
    "slots_ssp": (4, ["ps.mode=ssp", "ps.slots=1"], "ps.slots = 1 is fewer than the 3 pushers"),
    "slots_backup": (4, ["ps.mode=bsp", "ps.backup_workers=1", "ps.slots=2"],
                     "(ps.backup_workers leaves late pushes in their slots)"),
    "slots_zero": (3, ["ps.mode=bsp", "ps.slots=0"], "'ps.slots': must be >= 1, got 0"),
}


def launch(parts, impl, tmp_path, timeout=10):
    """MPMD launch of the wrapper: parts = [(ranks, extra args), ...]."""
    cmd = mpirun_prefix(impl)
    for i, (n, extra) in enumerate(parts):
        if i:
            cmd.append(":")
        cmd += ["-n", str(n), sys.executable, "-c", RANK_EXIT, *BASE,
                f"out_dir={tmp_path / 'run'}", *extra]
    return run_command(cmd, timeout, mpi_env(impl))


def rank_exits(stdout: str) -> dict:
    # not anchored to lines: the launcher may glue two ranks' lines together
    return dict(re.findall(r"rank (\d+) exit (-?\d+)", stdout))


def without_launcher_notes(stderr: str) -> list[str]:
    """Non-empty stderr lines minus the framed notes Open MPI's launcher adds on a
    non-zero exit ('prterun detected that one or more processes exited ...')."""
    lines, inside = [], False
    for line in stderr.splitlines():
        if re.fullmatch(r"-{20,}", line.strip()):
            inside = not inside
            continue
        if not inside and line.strip():
            lines.append(line)
    return lines


def check_agreed_exit(result, ranks: int, fragment: str) -> None:
    exits = rank_exits(result.stdout)
    assert exits == {str(r): "2" for r in range(ranks)}, describe(result)
    assert result.returncode == 2, describe(result)
    lines = without_launcher_notes(result.stderr)
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("hpcps: error: ") and fragment in lines[0], describe(result)
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_ps_input_exits_2_everywhere(case, mpi_impl, tmp_path):
    ranks, overrides, fragment = CASES[case]
    result = launch([(ranks, overrides)], mpi_impl, tmp_path)
    check_agreed_exit(result, ranks, fragment)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_config_that_differs_between_ranks(mpi_impl, tmp_path):
    # rank 1 alone sees another learning rate: the digests differ, every rank stops
    result = launch([(1, ["ps.mode=bsp", "train.lr=0.1"]), (2, ["ps.mode=bsp", "train.lr=0.2"])],
                    mpi_impl, tmp_path)
    check_agreed_exit(result, 3, "the resolved config differs between ranks (ranks [1, 2] differ")


def test_same_config_everywhere_runs(mpi_impl, tmp_path):
    # positive control for the launcher above: the same MPMD layout with equal configs trains
    result = launch([(1, ["ps.mode=bsp", "train.lr=0.1"]), (2, ["ps.mode=bsp", "train.lr=0.1"])],
                    mpi_impl, tmp_path, timeout=30)
    exits = rank_exits(result.stdout)
    assert exits == {"0": "0", "1": "0", "2": "0"}, describe(result)
    assert result.returncode == 0, describe(result)
