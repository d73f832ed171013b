"""The params gate and the push-slot protocol as units: the real windows and ``PSClient``
driven by ``tests/ps_protocol_cases.py`` under ``mpirun`` with 2, 3 and 4 ranks (one
owner, 1-3 workers), under each MPI. Each case has a negative control that runs the
same check where it must fail."""

from __future__ import annotations

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


@pytest.mark.parametrize("case", ["gate_bypassed", "slots_early_read"])
def test_negative_control_check_fails_where_it_must(mpi_impl, case):
    # these cases print OK when the check they control *rejected* what it saw
    passed_on_every_rank(case, 3, mpi_impl)
