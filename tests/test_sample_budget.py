"""asp and ssp with a global sample budget (``ps.budget = samples``, the default).

The job trains on ``max_steps x W x batch_size`` sequences in all, handed out batch by
batch to whichever worker is free. With the synthetic workload (integer gradients that
depend on the batch's items, SGD at lr 1) the final parameters are an exact sum, so a
batch lost, computed twice or taken past a sync point shows up as a wrong number:

- a straggler computes fewer batches, the fast workers more, every (step, item) once,
  with checkpoints in between, for asp and ssp (and the ssp bound still holds);
- a stop agreed on a signal in the middle, then a resume: still the exact sum, and one
  record per global step;
- ``ps.budget = worker_steps`` keeps the old rule (every worker its own max_steps), and
  a sample budget with a node hierarchy is one line, exit 2.
"""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest

from mpi_util import EXACT_SGD as SGD_BASE
from mpi_util import Job, check_ok, read_metrics, run_mpi, run_ok

pytestmark = pytest.mark.mpi

EXACT_SGD = [*SGD_BASE, "synthetic.n_params=501", "ps.servers=1"]
PATTERN = sum(1 + i % 5 for i in range(501))


def expected_sum(steps: int, workers: int) -> float:
    """Batch (step, item i) pushes (i + 1) x pattern: every item of every step once."""
    return -float(steps * sum(w + 1 for w in range(workers)) * PATTERN)


def pushes_per_worker(trace, workers: int) -> tuple[list[int], Counter]:
    """(pushes of each worker, how many batches of each global step were pushed)."""
    counts, steps = [], Counter()
    for w in range(workers):
        with open(trace / f"worker{w}.jsonl", encoding="utf-8") as fh:
            pushes = [json.loads(line) for line in fh if '"push"' in line]
        counts.append(len(pushes))
        steps.update(p["batch_step"] for p in pushes)
    return counts, steps


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["asp", "ssp"])
def test_fast_workers_take_more_of_the_budget(mpi_impl, tmp_path, mode):
    workers, steps = 4, 60
    run, trace = tmp_path / "run", tmp_path / "trace"
    check_ok(run_mpi(workers + 1, ["-q", "train", *EXACT_SGD, f"ps.mode={mode}",
                                   "ps.staleness=3", f"train.max_steps={steps}",
                                   "synthetic.compute_ms=2", "ps.straggler=1:4",
                                   "checkpoint.every=25", f"out_dir={run}"],
                     mpi_impl, timeout=150, env={"HPCPS_PS_TRACE": str(trace)}))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["val_param_sum"] == expected_sum(steps, workers)
    counts, per_step = pushes_per_worker(trace, workers)
    assert sum(counts) == steps * workers
    assert per_step == Counter({s: workers for s in range(steps)})
    # worker 1 computes 4x slower: it takes fewer batches than each fast worker
    fast = [c for w, c in enumerate(counts) if w != 1]
    assert counts[1] < min(fast), counts
    if mode == "asp":
        assert counts[1] < steps < max(fast), counts


@pytest.mark.timeout(240)
def test_stop_and_resume_keep_every_batch_once(tmp_path):
    workers, steps = 3, 400
    run = tmp_path / "run"
    args = ["-q", "train", *EXACT_SGD, "ps.mode=asp", f"train.max_steps={steps}",
            "synthetic.compute_ms=3", "ps.straggler=2:3", "checkpoint.every=150",
            f"out_dir={run}"]
    job = Job(args, run, n=workers + 1, name="stopped")
    job.wait_for_step(40, timeout=90)
    job.signal_rank(0, signal.SIGUSR1)
    assert job.wait(90) == 3, job.output()
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < steps, "the job finished before the stop: nothing was tested"
    run_ok(args, run, n=workers + 1, timeout=150, name="resumed")
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[-1]["val_param_sum"] == expected_sum(steps, workers)


@pytest.mark.timeout(120)
def test_worker_steps_budget_keeps_every_worker_at_max_steps(mpi_impl, tmp_path):
    workers, steps = 3, 30
    run, trace = tmp_path / "run", tmp_path / "trace"
    check_ok(run_mpi(workers + 1, ["-q", "train", *EXACT_SGD, "ps.mode=asp",
                                   "ps.budget=worker_steps", f"train.max_steps={steps}",
                                   "synthetic.compute_ms=1", "ps.straggler=1:4",
                                   f"out_dir={run}"],
                     mpi_impl, timeout=100, env={"HPCPS_PS_TRACE": str(trace)}))
    counts = []
    for w in range(workers):
        with open(trace / f"worker{w}.jsonl", encoding="utf-8") as fh:
            counts.append(sum(1 for line in fh if '"push"' in line))
    assert counts == [steps] * workers   # negative control of the budget above
    assert read_metrics(run)[-1]["val_param_sum"] == expected_sum(steps, workers)


def test_expected_sum_negative_control():
    assert expected_sum(60, 4) == -60 * 10 * PATTERN
    assert expected_sum(60, 4) != expected_sum(61, 4)
    assert expected_sum(60, 4) != expected_sum(60, 3)


@pytest.mark.timeout(60)
def test_samples_budget_with_a_node_hierarchy_is_one_line(tmp_path):
    run = tmp_path / "run"
    result = run_mpi(3, ["-q", "train", *EXACT_SGD, "ps.mode=asp", "ps.budget=samples",
                         "ps.hierarchy=node", f"out_dir={run}"], "mpich", timeout=50)
    errors = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "ps.budget = samples hands batches to single workers" in errors[0]
    assert not run.exists()
