"""Speed-balanced bsp (``ps.balance = speed``).

- the planner: the split that minimises the slowest slice, kept unless clearly beaten,
  and each worker's contiguous slice (exact values);
- W workers with a straggler and a moving split still equal one process with the
  global batch (rel 1e-5 per step), and the split really moved;
- restart: a run resumed from a checkpoint re-derives the split from the saved record
  and reproduces the uninterrupted run's steps bit for bit; ignoring the saved split
  (negative control) does not;
- a mode it cannot serve: one line, exit 2.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

from mpi_util import (SHAKESPEARE_CHAR, assert_same_run, check_ok, final_params, mismatches,
                      mpi_env, read_metrics, run_command, run_mpi, run_ok, train_args)

from hpcps.ps.balance import (SpeedAverages, equal_split, fastest_split, plan_split,
                              predicted_step_s, slice_of)


# -- the planner ---------------------------------------------------------------------------------
def test_equal_split_spreads_the_remainder_over_the_first_workers():
    assert equal_split(16, 4) == [4, 4, 4, 4]
    assert equal_split(10, 4) == [3, 3, 2, 2]


def test_fastest_split_follows_the_speeds():
    # worker 3 takes twice as long per sequence: 16 sequences, the slowest slice 5 units
    assert fastest_split(16, [1.0, 1.0, 1.0, 2.0]) == [5, 5, 4, 2]
    assert predicted_step_s([5, 5, 4, 2], [1.0, 1.0, 1.0, 2.0]) == 5.0
    assert predicted_step_s([5, 4, 4, 3], [1.0, 1.0, 1.0, 2.0]) == 6.0
    assert predicted_step_s([4, 4, 4, 4], [1.0, 1.0, 1.0, 2.0]) == 8.0
    # equal speeds: equal slices; a very slow worker keeps at least one sequence
    assert fastest_split(12, [2.0, 2.0, 2.0]) == [4, 4, 4]
    assert fastest_split(8, [1.0, 100.0]) == [7, 1]


def test_plan_keeps_a_split_that_is_not_clearly_beaten():
    speeds = [1.0, 1.0, 1.0, 2.0]
    assert plan_split(16, speeds, [4, 4, 4, 4]) == [5, 5, 4, 2]      # 37 % faster: switch
    assert plan_split(16, [1.0, 1.0, 1.0, 1.02], [4, 4, 4, 4]) == [4, 4, 4, 4]   # noise: keep
    assert plan_split(16, [1.0, 0.0, 1.0, 1.0], [5, 5, 3, 3]) == [5, 5, 3, 3]    # unmeasured
    assert plan_split(16, [1.0, 0.0, 1.0, 1.0], None) == [4, 4, 4, 4]
    assert plan_split(16, speeds, [8, 8]) == [5, 5, 4, 2]   # another worker count: replan


def test_slices_are_contiguous_and_cover_the_batch():
    counts = [5, 4, 4, 3]
    assert [slice_of(counts, w) for w in range(4)] == [(0, 5), (5, 9), (9, 13), (13, 16)]


def test_speed_average_is_a_moving_average_per_sequence():
    avg = SpeedAverages(2)
    avg.add(0, 2.0, 4)          # first measurement: taken as it is
    avg.add(0, 1.0, 1)          # then 70 % old, 30 % new
    avg.add(1, 0.0, 4)          # nothing measured: ignored
    assert avg.values == [pytest.approx(0.7 * 0.5 + 0.3 * 1.0), 0.0]


def test_planner_negative_control():
    # the checks above can fail: a split that ignores the speeds is slower
    assert fastest_split(16, [1.0, 1.0, 1.0, 2.0]) != equal_split(16, 4)


# -- the job ---------------------------------------------------------------------------------------
BATCH = 4
STEPS = 12
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.warmup_steps=2", "train.eval_every=0", "train.eval_steps=2",
        "train.peak_flops=1e9", f"train.batch_size={BATCH}", f"train.max_steps={STEPS}",
        "ps.servers=1"]
# rank 2 (worker 2 of 3; the server is rank 3) computes 4 times slower
BALANCED = ["ps.mode=bsp", "ps.balance=speed", "ps.straggler=2:4"]


def tiny(corpus, run, *extra) -> list[str]:
    return ["-q", *train_args(SHAKESPEARE_CHAR, corpus, run, *TINY, *extra)]


@pytest.mark.mpi
@pytest.mark.timeout(180)
def test_balanced_bsp_equals_one_process(mpi_impl, tmp_path, shakespeare_corpus):
    single = tmp_path / "single"
    check_ok(run_command([sys.executable, "-m", "hpcps",
                          *tiny(shakespeare_corpus, single, "ps.mode=single",
                                f"train.batch_size={3 * BATCH}")], 90, mpi_env(mpi_impl)))
    run = tmp_path / "balanced"
    check_ok(run_mpi(4, tiny(shakespeare_corpus, run, *BALANCED, "ps.balance_every=2"),
                     mpi_impl, timeout=120))
    ours = read_metrics(run)
    assert mismatches(ours, read_metrics(single)) == []
    splits = [r["split"] for r in ours]
    assert all(sum(s) == 3 * BATCH and min(s) >= 1 for s in splits)
    assert splits[0] == [4, 4, 4]
    # the straggler got fewer sequences once it was measured: the split really moved
    assert min(s[2] for s in splits) < BATCH, splits


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_resume_rederives_the_split_bit_for_bit(tmp_path, shakespeare_corpus):
    # one re-plan inside the compared steps: at step 6, where the checkpoint is, from
    # the averages the record of step 6 saved
    args = [*BALANCED, "ps.balance_every=6", "checkpoint.every=6", "checkpoint.keep=5"]
    ref = tmp_path / "ref" / "run"
    run_ok(tiny(shakespeare_corpus, ref, *args), ref, n=4, timeout=150)
    records = read_metrics(ref)
    assert records[6]["split"] != [BATCH] * 3, "no re-plan at step 6: nothing was tested"

    def resume_from_step_6(name: str, *extra) -> "Path":
        run = tmp_path / name / "run"
        shutil.copytree(ref, run)
        shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")
        job = run_ok(tiny(shakespeare_corpus, run, *args, *extra)[1:], run, n=4, timeout=150,
                     name=name)
        assert "resuming from" in job.stdout and "step_00000006" in job.stdout, job.output()
        return run
    resumed = resume_from_step_6("resumed")
    assert read_metrics(resumed)[6]["split"] == records[6]["split"]
    assert_same_run(resumed, ref)
    np.testing.assert_array_equal(final_params(resumed), final_params(ref))
    # negative control: the same resume with equal slices is visibly another summation
    other = resume_from_step_6("equal", "ps.balance=none")
    with pytest.raises(AssertionError):
        assert_same_run(other, ref)
    assert mismatches(read_metrics(other), records) == []   # still the same run to 1e-5


@pytest.mark.mpi
@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra,message", [
    (["ps.mode=asp", "ps.balance=speed"], "ps.balance = speed splits the global batch of a bsp "
                                          "step, but ps.mode = asp"),
    (["ps.mode=bsp", "ps.balance=fast"], "config key 'ps.balance': 'fast' is not one of none, "
                                         "speed"),
])
def test_balance_bad_input_is_one_line_exit_2(tmp_path, shakespeare_corpus, extra, message):
    run = tmp_path / "run"
    result = run_mpi(3, tiny(shakespeare_corpus, run, *extra), "mpich", timeout=50)
    errors = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert message in errors[0], errors
    assert not run.exists()
