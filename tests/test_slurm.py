"""A real sbatch job on a Slurm cluster: preempted with USR1, requeued, resumed, finished.

Needs a cluster (``bash slurm/local_cluster.sh up`` starts a one-node one here). Skipped
when ``sbatch`` is absent or no node answers, unless ``HPCPS_REQUIRE_SLURM=1`` (CI), where
that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from mpi_util import (
    REPO_ROOT,
    mpi_env,
    mpirun_prefix,
    read_metrics,
    require_implementation,
    run_ok,
    tiny_gpt_args,
)

pytestmark = pytest.mark.mpi

STEPS = 120


def require_slurm() -> None:
    required = os.environ.get("HPCPS_REQUIRE_SLURM", "") == "1"
    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch is not installed"
    else:
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                               timeout=30)
        states = state.stdout.split()
        if state.returncode != 0 or not {"idle", "mixed", "allocated"} & set(states):
            problem = (f"no Slurm node is up (sinfo: {state.stdout.strip() or state.stderr.strip()}); "
                       "start one with `bash slurm/local_cluster.sh up`")
    if problem:
        if required:
            pytest.fail(f"HPCPS_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30).stdout
    match = re.search(rf"\b{name}=(\S+)", out)
    return match.group(1) if match else ""


def wait_for(predicate, timeout: float, what: str, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            text = log.read_text()[-4000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{text}")
        time.sleep(0.2)


@pytest.mark.timeout(300)
def test_sbatch_preempted_requeued_resumed(shakespeare_corpus, tmp_path):
    require_slurm()
    require_implementation("mpich")
    extra = ["ps.mode=bsp", "ps.servers=1", f"train.max_steps={STEPS}", "ps.straggler=0:3"]
    ref = tmp_path / "ref" / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *extra)], ref, n=3)

    run, log = tmp_path / "job" / "run", tmp_path / "job" / "slurm.out"
    log.parent.mkdir(parents=True)
    env = mpi_env("mpich", {"HPCPS_PYTHON": sys.executable, "HPCPS_LAUNCHER": "srun"})
    submit = subprocess.run(
        ["sbatch", "--parsable", "--ntasks=3", "--ntasks-per-node=3", "--time=10",
         f"--output={log}", f"--chdir={REPO_ROOT}", "slurm/train.sbatch",
         *tiny_gpt_args(shakespeare_corpus, run, *extra)[1:]],
        capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        metrics = run / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 10, 120,
                 "the job's first 10 steps", log)
        # what Slurm does before a time limit with --signal=B:USR1@120, by hand
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        wait_for(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED")
                 and job_field(job_id, "Restarts") == "1", 180, "the requeued job to finish", log)
    finally:
        if job_field(job_id, "JobState") in ("PENDING", "RUNNING", "REQUEUED"):
            subprocess.run(["scancel", job_id], timeout=30)
    text = log.read_text()
    assert job_field(job_id, "JobState") == "COMPLETED", text[-4000:]
    assert "batch shell got SIGUSR1" in text and "requeueing job" in text, text[-4000:]
    assert "(restart 1)" in text and "resuming from" in text, text[-4000:]
    stopped = int(re.search(r"stopped at step (\d+)", text).group(1))
    assert 10 <= stopped < STEPS
    ours, theirs = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))
    assert ours[-1]["loss"] == theirs[-1]["loss"]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_sbatch_with_tasks_per_node_under_each_launcher(shakespeare_corpus, tmp_path, launcher):
    require_slurm()
    require_implementation("mpich")
    run, log = tmp_path / "run", tmp_path / "slurm.out"
    env = mpi_env("mpich", {"HPCPS_PYTHON": sys.executable, "HPCPS_LAUNCHER": launcher})
    submit = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=1", "--ntasks-per-node=3", "--time=5",
         f"--output={log}", f"--chdir={REPO_ROOT}", "slurm/train.sbatch",
         *tiny_gpt_args(shakespeare_corpus, run, "ps.mode=bsp", "train.max_steps=8")[1:]],
        capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=280)
    text = log.read_text() if log.exists() else ""
    assert submit.returncode == 0, submit.stderr + text[-3000:]
    assert "3 ranks on 1 node(s), 1 server(s)" in text and "2 worker(s)" in text, text[-3000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 9))


# -- the script's launch line for several nodes (no allocation needed) ----------------------
def dry_run(launcher: str, env_extra: dict) -> str:
    env = {**os.environ, "HPCPS_DRY_RUN": "1", "HPCPS_LAUNCHER": launcher, "SLURM_NTASKS": "10",
           "SLURM_NTASKS_PER_NODE": "5(x2)", "SLURM_JOB_NUM_NODES": "2", **env_extra}
    result = subprocess.run(["bash", "slurm/train.sbatch", "configs/gpt2_124m.toml", "ps.mode=bsp"],
                            capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=60)
    assert result.returncode == 0, result.stderr
    return next(x for x in result.stdout.splitlines() if x.startswith("would run:"))


@pytest.mark.parametrize("launcher,impl,placement", [
    ("srun", "mpich", "srun --mpi=pmi2 --kill-on-bad-exit=1 "),
    ("mpirun", "mpich", " -n 10 -ppn 5 "),
    ("mpirun", "openmpi", " -n 10 --map-by ppr:5:node "),
])
def test_two_node_launch_lines(launcher, impl, placement):
    require_implementation(impl)
    mpirun = mpirun_prefix(impl, 10)[0]
    line = dry_run(launcher, {"HPCPS_MPIRUN": mpirun})
    assert placement in line, line
    assert line.endswith("-m mpi4py -m hpcps train configs/gpt2_124m.toml train.resume=auto "
                         "ps.mode=bsp"), line
    # negative control: without the per-node count mpirun gets no placement at all
    if launcher == "mpirun":
        bare = dry_run(launcher, {"HPCPS_MPIRUN": mpirun, "SLURM_NTASKS_PER_NODE": ""})
        assert placement not in bare and " -n 10 " in bare, bare
