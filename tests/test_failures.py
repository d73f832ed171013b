"""Signals, silent ranks and bad input, end to end.

- SIGUSR1 / SIGTERM to any rank (worker or server) in single, allreduce, bsp and
  asp: every rank stops at one step boundary, the checkpoint of that step is
  committed, the job exits 3; the resumed job finishes with one record per step.
- SIGSTOP of a worker: reported by rank; bsp aborts within ps.dead_timeout naming
  it; asp keeps training and finishes once the worker is continued.
- Bad input: one line, exit 2, the previous checkpoints untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from mpi_util import (
    Job,
    checkpoint_steps,
    read_metrics,
    require_implementation,
    run_ok,
    tiny_gpt_args,
)

pytestmark = pytest.mark.mpi

LONG = "train.max_steps=3000"


# -- signals: stop, checkpoint, exit 3, resume ---------------------------------------------------
SIGNAL_CASES = [  # (mode, ranks, rank to signal, signal)
    ("single", 0, 0, signal.SIGTERM),
    ("allreduce", 2, 1, signal.SIGUSR1),
    ("bsp", 3, 2, signal.SIGUSR1),   # rank 2 is the server
    ("bsp", 3, 1, signal.SIGTERM),
    ("asp", 3, 1, signal.SIGUSR1),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode,n,rank,sig", SIGNAL_CASES,
                         ids=[f"{m}-rank{r}-{s.name}" for m, _, r, s in SIGNAL_CASES])
def test_signal_checkpoints_and_exits_3(shakespeare_corpus, tmp_path, mode, n, rank, sig):
    if n:
        require_implementation("mpich")
    run = tmp_path / "run"
    args = tiny_gpt_args(shakespeare_corpus, run, f"ps.mode={mode}", "ps.servers=1", LONG)
    job = Job(["-q", *args], run, n=n, name="signalled")
    job.wait_for_step(5)
    job.signal_rank(rank, sig)
    sent = time.monotonic()
    assert job.wait(60) == 3, job.output()
    assert time.monotonic() - sent < 20
    stopped = checkpoint_steps(run)[-1]
    assert 5 <= stopped < 3000
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 1))
    manifest = json.loads((run / "checkpoints" / f"step_{stopped:08d}" / "manifest.json")
                          .read_text())
    assert manifest["reason"]["stop"] is True
    # the reason is the lead worker's (world rank 0): it names the signal when it got it
    assert manifest["reason"]["signal"] == (sig.name if rank == 0 else "")
    assert manifest["mode"] == mode
    # requeued: resume and finish a few steps later
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, f"ps.mode={mode}", "ps.servers=1",
                                   f"train.max_steps={stopped + 4}"), run, n=n, name="resumed")
    assert f"step_{stopped:08d}" in resumed.stdout, resumed.output()
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 5))
    assert checkpoint_steps(run)[-1] == stopped + 4


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["asp", "bsp"])
def test_stop_signalled_during_a_checkpoint_keeps_every_record(shakespeare_corpus, tmp_path,
                                                              mode):
    """Both workers get SIGUSR1 while they write the checkpoint of step 3 (as Slurm signals
    every rank). asp (sample budget): the stop is agreed at step 3 itself, a second meeting
    there (nothing trained since), whose checkpoint must carry step 3's record again; it
    once lost it, and the resumed run skipped step 3's record. bsp: the stop comes one step
    later."""
    require_implementation("mpich")
    run = tmp_path / "run"
    args = tiny_gpt_args(shakespeare_corpus, run, f"ps.mode={mode}", "ps.servers=1", LONG)
    job = Job(["-q", *args], run, n=3, name="signalled",
              env={"HPCPS_CHECKPOINT_FAULT": "sigusr1:step=3:rank=0,1"})
    assert job.wait(90) == 3, job.output()
    stopped = checkpoint_steps(run)[-1]
    assert stopped >= 3
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 1))
    run_ok(tiny_gpt_args(shakespeare_corpus, run, f"ps.mode={mode}", "ps.servers=1",
                         f"train.max_steps={stopped + 3}"), run, n=3, name="resumed")
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 4))


@pytest.mark.timeout(180)
def test_signal_in_bsp_under_both_mpis(shakespeare_corpus, tmp_path, mpi_impl):
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, "ps.mode=bsp", LONG)], run, n=3,
              impl=mpi_impl, name="signalled")
    job.wait_for_step(4)
    job.signal_rank(0, signal.SIGUSR1)
    assert job.wait(60) == 3, job.output()
    assert checkpoint_steps(run)[-1] == len(read_metrics(run))


@pytest.mark.timeout(180)
def test_stop_while_a_worker_waits_past_the_boundary(shakespeare_corpus, tmp_path):
    """A worker one step ahead (waiting in its bsp pull, or parked at a checkpoint) must
    still answer the stop proposal of a worker that got the signal a step earlier: this
    deadlocked when only ``decide`` looked at the stop request."""
    require_implementation("mpich")
    for attempt, (rank, at) in enumerate([(0, 2), (0, 3), (1, 4), (0, 5), (1, 3), (0, 4)]):
        run = tmp_path / f"run{attempt}"
        job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, "ps.mode=bsp", LONG,
                                         "checkpoint.every=2")], run, n=3, name=f"stop{attempt}")
        job.wait_for_step(at)
        job.signal_rank(rank, signal.SIGUSR1)
        assert job.wait(30) == 3, job.output()
        assert checkpoint_steps(run)[-1] == len(read_metrics(run))


# -- silent ranks --------------------------------------------------------------------------------
WATCH = ["ps.heartbeat_timeout=1", "ps.dead_timeout=3"]


def wait_for_text(job: Job, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while text not in job.stderr:
        if time.monotonic() > deadline or job.proc.poll() is not None:
            pytest.fail(f"no {text!r} on stderr\n{job.output()}")
        time.sleep(0.05)
    return time.monotonic()


@pytest.mark.timeout(120)
def test_stopped_worker_aborts_bsp_naming_it(shakespeare_corpus, tmp_path):
    require_implementation("mpich")
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, "ps.mode=bsp", LONG, *WATCH)], run,
              n=3, name="bsp")
    job.wait_for_step(5)
    pid = job.rank_pids()[1]
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code = job.wait(60)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    assert code == 4, job.output()  # EXIT_PEER_DEAD
    assert time.monotonic() - stopped < 3 + 10
    assert "warning: worker rank 1" in job.stderr and "silent" in job.stderr, job.output()
    assert "error: worker rank 1" in job.stderr and "dead_timeout = 3" in job.stderr


@pytest.mark.timeout(120)
def test_stopped_worker_asp_keeps_training(shakespeare_corpus, tmp_path):
    require_implementation("mpich")
    run = tmp_path / "run"
    args = tiny_gpt_args(shakespeare_corpus, run, "ps.mode=asp", LONG, "train.max_steps=200000",
                         "checkpoint.every=0", "ps.heartbeat_timeout=1", "ps.dead_timeout=60")
    job = Job(["-q", *args], run, n=3, name="asp")
    job.wait_for_step(5)
    pid = job.rank_pids()[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for_text(job, "warning: worker rank 1", 15)
        before = job.steps_written()
        time.sleep(1.0)
        assert job.steps_written() >= before + 10, "the lead worker stopped training"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for_text(job, "worker rank 1 is back", 15)
    job.signal_rank(0, signal.SIGUSR1)  # the run is long: stop it the way Slurm would
    assert job.wait(60) == 3, job.output()
    stopped = checkpoint_steps(run)[-1]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, stopped + 1))


# -- bad input: one line, exit 2, previous checkpoints untouched ---------------------------------
def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(job: Job, code: int = 2) -> str:
    rc = job.wait(60)
    lines = job.stderr.strip().splitlines()
    assert rc == code and len(lines) == 1, job.output()
    return lines[0]


TEXT = "the quick brown fox jumps over the lazy dog; then it sleeps.\n" * 200


@pytest.fixture
def first_run(make_corpus, tmp_path):
    corpus = make_corpus(TEXT)
    run = tmp_path / "run"
    run_ok(["-q", *tiny_gpt_args(corpus, run, "train.max_steps=6")], run, name="first")
    return corpus, run, fingerprint(run / "checkpoints")


@pytest.mark.timeout(120)
def test_other_model_shape(first_run):
    corpus, run, before = first_run
    job = Job(tiny_gpt_args(corpus, run, "model.n_embd=16", "model.n_layer=2"), run, name="shape")
    line = one_line_error(job)
    assert "step_00000006 was written for n_embd=32, n_layer=1" in line, line
    assert "this run has n_embd=16, n_layer=2" in line
    assert fingerprint(run / "checkpoints") == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("change", ["one_more_char", "same_size_other_chars"])
def test_other_vocab_or_tokenizer(first_run, make_corpus, change):
    corpus, run, before = first_run
    if change == "one_more_char":
        text = TEXT + "!"
    else:  # '.' becomes '?': the same vocabulary size, other ids
        text = TEXT.replace(".", "?")
    other = make_corpus(text)
    job = Job(tiny_gpt_args(other, run), run, name="vocab")
    line = one_line_error(job)
    assert "written for" in line and "tokenizer_sha256=" in line, line
    if change == "one_more_char":
        assert "vocab_size=" in line
    else:
        assert "vocab_size" not in line
    assert fingerprint(run / "checkpoints") == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["missing", "no_manifest", "bad_manifest"])
def test_bad_resume_path(first_run, tmp_path, case):
    corpus, run, _ = first_run
    target = run / "checkpoints" / "step_00000006"
    if case == "missing":
        target = run / "checkpoints" / "step_00000099"
        expect = "does not exist"
    elif case == "no_manifest":
        (target / "manifest.json").unlink()
        expect = "manifest missing"
    else:
        (target / "manifest.json").write_text('{"format": "hpcps-checkpoint", "step":')
        expect = "manifest is not valid JSON"
    before = fingerprint(run / "checkpoints")
    job = Job(tiny_gpt_args(corpus, run, f"train.resume={target}"), run, name="path")
    line = one_line_error(job)
    assert expect in line and str(target) in line, line
    assert fingerprint(run / "checkpoints") == before


@pytest.mark.timeout(120)
def test_checkpoint_dir_not_writable(first_run, tmp_path):
    corpus, run, before = first_run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    job = Job(tiny_gpt_args(corpus, run, f"checkpoint.dir={blocker}/ckpt"), run, name="dir")
    line = one_line_error(job)
    assert f"checkpoint.dir {blocker}/ckpt cannot be created or written" in line, line
    assert fingerprint(run / "checkpoints") == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("background", ["true", "false"])
def test_disk_full_keeps_the_previous_checkpoint(first_run, background):
    corpus, run, before = first_run
    full = {"HPCPS_CHECKPOINT_FAULT": "enospc:step=9:rank=0"}
    job = Job(tiny_gpt_args(corpus, run, "train.max_steps=20",
                            f"checkpoint.background={background}"), run, env=full, name="full")
    line = one_line_error(job)
    assert "checkpoint at step 9: cannot write" in line and "No space left on device" in line, line
    kept = fingerprint(run / "checkpoints")
    assert kept == before  # the resumed-from and older checkpoints, byte for byte


@pytest.mark.timeout(120)
@pytest.mark.parametrize("background", ["true", "false"])
def test_disk_full_on_a_server_ends_the_job_with_exit_2(first_run, background):
    require_implementation("mpich")
    corpus, run, before = first_run
    full = {"HPCPS_CHECKPOINT_FAULT": "enospc:step=9:rank=2"}
    job = Job(tiny_gpt_args(corpus, run, "ps.mode=bsp", "train.max_steps=20",
                            f"checkpoint.background={background}"), run, n=3, env=full,
              name="full")
    assert job.wait(60) == 2, job.output()
    errors = [x for x in job.stderr.splitlines() if x.startswith("hpcps: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], job.output()
    steps = checkpoint_steps(run)
    assert 9 not in steps and 6 in steps
