"""The params gate and the push-slot protocol as units: the real windows and ``PSClient``
driven by ``tests/ps_protocol_cases.py`` under ``mpirun`` with 2, 3 and 4 ranks (one
owner, 1-3 workers), under each MPI. Each case has a negative control that runs the
same check where it must fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mpi_util import describe, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(120)]

CASES = Path(__file__).with_name("ps_protocol_cases.py")


def passed_on_every_rank(case: str, ranks: int, impl: str, env=None) -> None:
    """Every rank printed ``OK case`` (the launcher may join lines of different ranks)."""
    result = run_mpi(ranks, [case], impl, timeout=60, program=[str(CASES)], env=env)
    assert result.returncode == 0, describe(result)
    assert "FAIL" not in result.stdout and result.stdout.count(f"OK {case}") == ranks, \
        describe(result)


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("case", ["gate", "slots"])
def test_protocol_case(mpi_impl, case, ranks):
    passed_on_every_rank(case, ranks, mpi_impl)


@pytest.mark.parametrize("case", ["gate", "slots"])
def test_protocol_case_over_the_network(net_impl, case):
    passed_on_every_rank(case, 3, net_impl)


def atomic_seconds(impl: str) -> float:
    result = run_mpi(2, ["target_progress"], impl, timeout=60, program=[str(CASES)])
    assert result.returncode == 0, describe(result)
    # the two ranks' lines may interleave without a newline between them ("0.900504OK ...")
    return float(re.search(r"ATOMIC (\d+\.\d+)", result.stdout).group(1))


def test_network_path_really_goes_through_the_network_module(net_impl):
    """An atomic to a rank sleeping outside MPI completes only when it wakes (~0.9 s) on the
    network path the network tests use; through shared memory at once (the control)."""
    assert atomic_seconds(net_impl) > 0.5
    shared = net_impl.split("+")[0]
    assert atomic_seconds(shared) < 0.2


@pytest.mark.parametrize("case", ["gate_bypassed", "slots_early_read"])
def test_negative_control_check_fails_where_it_must(mpi_impl, case):
    # these cases print OK when the check they control *rejected* what it saw
    passed_on_every_rank(case, 3, mpi_impl)
