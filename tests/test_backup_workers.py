"""bsp with backup workers (``ps.backup_workers = b``).

- the rule: a step waits for W - b pushes of its own step, never lets a worker fall
  two steps behind, and waits for all W before a sync point every rank knows;
- no data dropped: with a straggler whose pushes mostly come late, the servers apply
  exactly max_steps x W x batch_size sequences (late ones one step later, counted as
  staleness 1), with a checkpoint in between and across a stop and a resume;
- bad input (b >= workers, another mode): one line, exit 2.
"""

from __future__ import annotations

import re
import signal

import pytest

from mpi_util import Job, check_ok, read_metrics, run_mpi, run_ok

from hpcps.config import load_config
from hpcps.ps.backup import Carry, step_is_ready, sync_boundary_ahead


# -- the rule ------------------------------------------------------------------------------------
def test_a_step_waits_for_all_but_b_pushes():
    # W = 4, b = 1, every worker has pushed step 9: update 10 needs 3 pushes of step 10
    through = [9, 9, 9, 9]
    assert not step_is_ready(10, 2, through, backup=1, need_all=False)
    assert step_is_ready(10, 3, through, backup=1, need_all=False)
    assert not step_is_ready(10, 3, through, backup=0, need_all=False)   # plain bsp
    assert not step_is_ready(10, 3, through, backup=1, need_all=True)    # a sync point ahead
    assert step_is_ready(10, 4, through, backup=1, need_all=True)


def test_no_worker_falls_two_steps_behind():
    # worker 3's push of step 9 is neither applied nor carried: step 10 must wait for it
    assert not step_is_ready(10, 3, [9, 9, 9, 8], backup=1, need_all=False)
    assert step_is_ready(10, 3, [10, 10, 10, 9], backup=1, need_all=False)


def test_sync_points_known_in_advance():
    cfg = load_config(None, ["checkpoint.every=5", "train.max_steps=12"])
    assert [s for s in range(1, 13) if sync_boundary_ahead(cfg, s, start_step=0)] == [5, 10, 12]
    assert not sync_boundary_ahead(cfg, 5, start_step=5)   # the boundary we resumed at


def test_carry_books_its_pushes():
    carry = Carry(3)
    carry.acc += 2.0
    carry.add(weight=2.0, loss=1.5, items=4)
    carry.add(weight=1.0, loss=3.0, items=2)
    assert (carry.weight, carry.loss, carry.items, carry.count) == (3.0, 6.0, 6, 2)
    carry.clear()
    assert (carry.weight, carry.loss, carry.items, carry.count) == (0.0, 0.0, 0, 0)
    assert carry.acc.tolist() == [0.0, 0.0, 0.0]


# -- the job ---------------------------------------------------------------------------------------
SYNTHETIC = ["workload=synthetic", "train.optimizer=sgd", "train.momentum=0",
             "train.weight_decay=0", "train.grad_clip=0", "train.lr=1", "train.min_lr=1",
             "train.warmup_steps=0", "train.batch_size=2", "train.eval_every=0",
             "train.peak_flops=1e9", "synthetic.n_params=301", "ps.servers=1",
             "synthetic.compute_ms=2"]


def late_pushes(records) -> int:
    """Pushes applied one update late, over a run's records."""
    return sum(counts[1] for r in records if len(counts := r.get("staleness_counts", [])) > 1)


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_late_pushes_are_applied_not_dropped(mpi_impl, tmp_path):
    workers, steps = 3, 60
    run = tmp_path / "run"
    check_ok(run_mpi(workers + 1, ["-q", "train", *SYNTHETIC, "ps.mode=bsp",
                                   "ps.backup_workers=1", "ps.straggler=1:4",
                                   f"train.max_steps={steps}", "checkpoint.every=20",
                                   f"out_dir={run}"], mpi_impl, timeout=120))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    # every sequence applied exactly once: max_steps x W x batch_size in all
    assert sum(r["items"] for r in records) == steps * workers * 2
    # the straggler's pushes really came late (staleness 1) most of the time
    assert late_pushes(records) >= steps // 3, [r.get("staleness_counts") for r in records]


@pytest.mark.mpi
@pytest.mark.timeout(200)
def test_stop_and_resume_with_backup_workers(tmp_path):
    workers, steps = 3, 300
    run = tmp_path / "run"
    args = ["-q", "train", *SYNTHETIC, "ps.mode=bsp", "ps.backup_workers=1",
            "ps.straggler=1:4", f"train.max_steps={steps}", f"out_dir={run}"]
    job = Job(args, run, n=workers + 1, name="stopped")
    job.wait_for_step(30, timeout=90)
    job.signal_rank(0, signal.SIGUSR1)
    assert job.wait(90) == 3, job.output()
    first = read_metrics(run)
    stopped = first[-1]["step"]
    assert stopped < steps, "the job finished before the stop: nothing was tested"
    # late pushes still carried at the stop are applied in one extra update before its
    # checkpoint (after the records were written); the server says how many sequences
    extra = [int(m) for m in re.findall(r"late push\(es\), (\d+) sequences", job.stderr)]
    assert len(extra) <= 1, job.stderr
    carried = sum(extra)
    assert sum(r["items"] for r in first) + carried == stopped * workers * 2
    run_ok(args, run, n=workers + 1, timeout=150, name="resumed")
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert sum(r["items"] for r in records) + carried == steps * workers * 2


def test_late_push_count_negative_control():
    assert late_pushes([{"staleness_counts": [2, 1]}, {"staleness_counts": [3]}, {}]) == 1


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,message", [
    (["ps.mode=bsp", "ps.backup_workers=2"], "ps.backup_workers = 2 must be below the number "
                                             "of workers (2)"),
    (["ps.mode=asp", "ps.backup_workers=1"], "ps.backup_workers = 1 is a bsp rule, but "
                                             "ps.mode = asp"),
    (["ps.mode=bsp", "ps.delay_compensation=dc"], "ps.delay_compensation = dc corrects stale "
                                                  "pushes"),
])
def test_backup_bad_input_is_one_line_exit_2(tmp_path, extra, message):
    run = tmp_path / "run"
    result = run_mpi(3, ["-q", "train", *SYNTHETIC, *extra, f"out_dir={run}"], "mpich",
                     timeout=50)
    errors = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert message in errors[0], errors
    assert not run.exists()
