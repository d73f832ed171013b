"""``ps.link_gbps``: each worker's pulls and pushes take at least their bytes' time on a
link of that many Gb/s (hpcps/ps/client.py, ``EmulatedLink``).

Real bsp runs of the tiny GPT: every step takes at least the link time of the bytes the
metrics say it moved, while losses, gradient norms and the val loss stay bit-identical
to the same run at full speed (which is far faster: the negative control). int4 pushes
are charged their encoded bytes, not fp32's. A link wait longer than ``ps.dead_timeout``
keeps the heartbeats going (the same wait without them, a bare sleep of the synthetic
workload, gets the job aborted)."""

import math
import statistics

import pytest
from mpi_util import (
    SHAKESPEARE_CHAR,
    check_ok,
    describe,
    read_metrics,
    require_implementation,
    run_mpi,
    train_args,
)

from hpcps.ps.sharding import shard_ranges
from hpcps.ps.windows import SLOT_HEADER

pytestmark = pytest.mark.mpi

STEPS = 6
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.batch_size=2", f"train.max_steps={STEPS}", "train.warmup_steps=2",
        "train.eval_every=0", "train.eval_steps=2", "train.peak_flops=1e9", "ps.mode=bsp"]
# ~15 k params: a pull and an fp32 push of 60 kB each take 0.24 s at 0.004 Gb/s
SLOW_GBPS = 0.004


def train(corpus, run_dir, impl, ranks: int, *extra) -> list[dict]:
    check_ok(run_mpi(ranks, ["-q", *train_args(SHAKESPEARE_CHAR, corpus, run_dir, *TINY, *extra)],
                     impl, timeout=60))
    return read_metrics(run_dir)


def link_seconds(record: dict, gbps: float) -> float:
    """Time the step's pushed and pulled bytes (from its own metrics) take on the link."""
    return (record["push_mb"] + record["pull_mb"]) * 1e6 * 8 / (gbps * 1e9)


def step_times(records) -> list[float]:
    """step_s of steps 2.. (a step's time runs from the previous step's end)."""
    return [r["step_s"] for r in records[1:]]


@pytest.mark.timeout(120)
def test_slow_link_slows_steps_not_results(mpi_impl, shakespeare_corpus, tmp_path):
    fast = train(shakespeare_corpus, tmp_path / "fast", mpi_impl, 3)
    slow = train(shakespeare_corpus, tmp_path / "slow", mpi_impl, 3, f"ps.link_gbps={SLOW_GBPS}")
    # the same training, bit for bit
    assert [(r["loss"], r["grad_norm"]) for r in slow] == [(r["loss"], r["grad_norm"]) for r in fast]
    assert slow[-1]["val_loss"] == fast[-1]["val_loss"]
    assert [(r["push_mb"], r["pull_mb"]) for r in slow] == [(r["push_mb"], r["pull_mb"])
                                                            for r in fast]
    need = link_seconds(slow[-1], SLOW_GBPS)
    assert 0.2 < need < 0.3   # the arithmetic above: about 120 kB per step
    # a pull, then a push: each step waits out both, one after the other
    for record in slow[1:]:
        assert record["step_s"] >= 0.99 * link_seconds(record, SLOW_GBPS), record
    # ... and not much more (the tiny model computes in milliseconds)
    assert statistics.median(step_times(slow)) < 1.5 * need, step_times(slow)
    # negative control: at full speed the same steps are much faster than the link time
    assert statistics.median(step_times(fast)) < 0.25 * need, step_times(fast)


@pytest.mark.timeout(120)
def test_int4_pushes_are_charged_their_encoded_bytes(mpi_impl, shakespeare_corpus, tmp_path):
    records = train(shakespeare_corpus, tmp_path / "int4", mpi_impl, 4, "ps.servers=2",
                    "ps.compression=int4", f"ps.link_gbps={SLOW_GBPS}")
    n_params = round(records[-1]["pull_mb"] * 1e6) // 4
    # per shard: the slot header, one fp32 scale per 64 elements, two codes per byte
    pushed = sum(SLOT_HEADER + 4 * math.ceil((hi - lo) / 64) + math.ceil((hi - lo) / 2)
                 for lo, hi in shard_ranges(n_params, 2))
    assert [r["push_mb"] for r in records] == [pushed / 1e6] * STEPS
    assert pushed < 0.15 * 4 * n_params
    for record in records[1:]:
        assert record["step_s"] >= 0.99 * link_seconds(record, SLOW_GBPS), record
    # the link carried the encoded bytes: a step is clearly shorter than an fp32 push's
    fp32_step = 2 * 4 * n_params * 8 / (SLOW_GBPS * 1e9)
    assert statistics.median(step_times(records)) < 0.85 * fp32_step, step_times(records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


# 25,000 synthetic params: a pull takes 2.5 s at 0.00032 Gb/s, longer than ps.dead_timeout
WATCHED = ["train", "workload=synthetic", "synthetic.n_params=25000", "train.batch_size=1",
           "train.max_steps=1", "train.eval_every=0", "train.peak_flops=1e9",
           "ps.heartbeat_timeout=1", "ps.dead_timeout=2"]


@pytest.mark.timeout(120)
def test_link_wait_keeps_the_heartbeats_going(tmp_path):
    require_implementation("mpich")
    result = run_mpi(2, ["-q", *WATCHED, "ps.link_gbps=0.00032", f"out_dir={tmp_path / 'slow'}"],
                     "mpich", timeout=60)
    check_ok(result)
    assert "silent" not in result.stdout + result.stderr, describe(result)
    (record,) = read_metrics(tmp_path / "slow")
    assert record["wall_s"] >= 2 * 2.5 * 0.99   # the first pull and the push
    # negative control: a wait as long without heartbeats (a bare sleep) ends the job
    result = run_mpi(2, ["-q", *WATCHED, "synthetic.compute_ms=2500",
                         f"out_dir={tmp_path / 'sleep'}"], "mpich", timeout=60)
    assert result.returncode != 0
    assert "worker rank 0" in result.stderr and "dead_timeout = 2" in result.stderr, describe(result)
