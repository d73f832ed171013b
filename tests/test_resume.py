"""Interrupted runs resume exactly where they stopped.

- kill -9 of a random rank at a random step: the job ends non-zero within 30 s, and
  the rerun with resume=auto reproduces the uninterrupted bsp run bit for bit
  (per-step loss and gradient norm, final parameters, one metrics record per step);
- a crash in the middle of a checkpoint write: the torn checkpoint is never loaded;
- a flipped byte in a committed shard: detected, the previous checkpoint is used;
- elastic restart: a checkpoint of S=1, W=3 continues on S=2, W=2.

The tiny run (``tiny_gpt_args``), ``Job`` and the run comparisons come from mpi_util,
shared with test_failures.py and test_slurm.py.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
from mpi_util import (
    TINY_GPT_STEPS,
    Job,
    assert_same_run,
    checkpoint_steps,
    final_params,
    read_metrics,
    require_implementation,
    run_ok,
    tiny_gpt_args,
)

pytestmark = pytest.mark.mpi


# -- kill -9 a random rank at a random step ----------------------------------------------------
BSP = ["ps.mode=bsp", "ps.servers=1"]


@pytest.fixture(scope="module")
def bsp_reference(shakespeare_corpus, tmp_path_factory):
    require_implementation("mpich")
    run = tmp_path_factory.mktemp("bsp_ref") / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run, *BSP)], run, n=3)
    return run


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_a_random_rank_then_resume_bit_identical(shakespeare_corpus, bsp_reference, tmp_path,
                                                      seed):
    rng = random.Random(seed)
    victim, at_step = rng.choice([0, 1, 2]), rng.randint(7, 25)  # rank 2 is the server
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *BSP)], run, n=3, name="killed")
    job.wait_for_step(at_step)
    job.signal_rank(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    code = job.wait(60)
    assert code != 0 and time.monotonic() - killed_at < 30, job.output()
    written = job.steps_written()
    assert written < TINY_GPT_STEPS, "the job finished before the kill: nothing was tested"
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *BSP), run, n=3, name="resumed")
    assert "resuming from" in resumed.stdout, resumed.output()
    assert_same_run(run, bsp_reference)
    np.testing.assert_array_equal(final_params(run), final_params(bsp_reference))


@pytest.mark.timeout(300)
def test_kill_then_resume_over_the_network_is_bit_identical(shakespeare_corpus, tmp_path, net_impl):
    ref = tmp_path / "ref"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *BSP, "train.max_steps=20")], ref, n=3,
           impl=net_impl, timeout=150, name="reference")
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *BSP, "train.max_steps=20")], run,
              n=3, impl=net_impl, name="killed")
    job.wait_for_step(10, timeout=120)
    job.signal_rank(2, signal.SIGKILL)   # the server
    assert job.wait(60) != 0, job.output()
    assert job.steps_written() < 20, "the job finished before the kill: nothing was tested"
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *BSP, "train.max_steps=20"), run, n=3,
                     impl=net_impl, timeout=150, name="resumed")
    assert "resuming from" in resumed.stdout, resumed.output()
    assert_same_run(run, ref)
    np.testing.assert_array_equal(final_params(run), final_params(ref))


# -- a crash in the middle of a checkpoint write -------------------------------------------------
@pytest.mark.timeout(180)
def test_crash_during_a_checkpoint_write_is_never_loaded(shakespeare_corpus, bsp_reference,
                                                         tmp_path):
    run = tmp_path / "run"
    crash = {"HPCPS_CHECKPOINT_FAULT": "kill:step=9:rank=2"}  # the server, half-way in its shard
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *BSP)], run, n=3, env=crash,
              name="crashed")
    assert job.wait(60) != 0, job.output()
    names = sorted(os.listdir(run / "checkpoints"))
    assert "step_00000009.tmp" in names and "step_00000009" not in names, names
    assert "step_00000006" in names
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *BSP), run, n=3, name="resumed")
    assert "resuming from" in resumed.stdout and "step_00000006" in resumed.stdout, resumed.output()
    assert not [n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")]
    assert_same_run(run, bsp_reference)
    np.testing.assert_array_equal(final_params(run), final_params(bsp_reference))


# -- a flipped byte in a committed shard (one process: the same code path, faster) ----------------
@pytest.fixture(scope="module")
def single_reference(shakespeare_corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("single_ref") / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run)], run)
    return run


@pytest.mark.timeout(120)
def test_flipped_byte_falls_back_to_the_previous_checkpoint(shakespeare_corpus, single_reference,
                                                            tmp_path):
    run = tmp_path / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run, "train.max_steps=20")], run, name="first")
    assert checkpoint_steps(run) == [15, 18, 20]
    shard = run / "checkpoints" / "step_00000020" / "server_0000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    job = run_ok(tiny_gpt_args(shakespeare_corpus, run), run, name="resumed")
    assert "step_00000020/server_0000.h5" in job.stderr and "skipping" in job.stderr, job.output()
    assert "resuming from" in job.stdout and "step_00000018" in job.stdout, job.output()
    assert_same_run(run, single_reference)
    np.testing.assert_array_equal(final_params(run), final_params(single_reference))


@pytest.mark.timeout(120)
def test_resumed_run_differs_from_a_fresh_start(shakespeare_corpus, single_reference, tmp_path):
    """Negative control: the comparisons above notice a run that did not resume."""
    run = tmp_path / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run, "train.max_steps=20", "train.seed=7")],
           run)
    with pytest.raises(AssertionError):
        assert_same_run(run, single_reference)


# -- elastic restart: S=1, W=3 -> S=2, W=2 with the same global batch ------------------------------
@pytest.mark.timeout(240)
def test_elastic_restart_continues_from_the_same_parameters(shakespeare_corpus, tmp_path):
    require_implementation("mpich")
    w3 = ["ps.mode=bsp", "ps.servers=1", "train.batch_size=2"]   # global batch 6
    w2 = ["ps.mode=bsp", "ps.servers=2", "train.batch_size=3"]   # global batch 6
    ref, run = tmp_path / "ref" / "run", tmp_path / "elastic" / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *w3, "train.max_steps=16")], ref, n=4)
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run, *w3, "train.max_steps=10")], run, n=4)
    before, first_records = final_params(run), read_metrics(run)
    job = run_ok(tiny_gpt_args(shakespeare_corpus, run, *w2, "train.max_steps=16"), run, n=4)
    assert "resuming from" in job.stdout and "step_00000010" in job.stdout, job.output()
    ours, theirs = read_metrics(run), read_metrics(ref)
    assert [r["step"] for r in ours] == list(range(1, 17))
    assert ours[:9] == first_records[:9]  # written by the first run, kept as they were
    # record 10 is written again from the checkpoint (the first run added its final eval)
    assert {k: v for k, v in first_records[9].items() if not k.startswith("val_")} == ours[9]
    # step 11 is the loss of the saved parameters on the same 6 sequences: only the
    # summation order of the worker means differs
    assert ours[10]["loss"] == pytest.approx(theirs[10]["loss"], rel=1e-6)
    for a, b in zip(ours[10:], theirs[10:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    from hpcps.checkpoint import open_checkpoint
    manifest = open_checkpoint(str(run)).manifest
    assert (manifest["n_servers"], manifest["n_workers"], manifest["step"]) == (2, 2, 16)
    assert len(manifest["shards"]) == 2
    np.testing.assert_allclose(final_params(run), final_params(ref), rtol=1e-3, atol=1e-5)
    assert not np.array_equal(before, final_params(run))
    # negative control: a different global batch (W=2, b=2) is visibly another run
    other = tmp_path / "other" / "run"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, other, *w3, "train.max_steps=10")], other, n=4)
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, other, "ps.mode=bsp", "ps.servers=2",
                                  "train.batch_size=2", "train.max_steps=11")], other, n=4)
    assert read_metrics(other)[10]["loss"] != pytest.approx(theirs[10]["loss"], rel=1e-4)
