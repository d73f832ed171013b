"""``ps.read_your_writes`` (asp/ssp): a worker's pull waits until the servers applied its
previous push, so every gradient it computes sees its own last update.

- one asp worker with read-your-writes: every push is applied to exactly the params it
  was computed on (staleness 0 at every step); the negative control (false) pulls before
  its own push is applied and so shows stale pushes;
- the one-process simulation models both: with read-your-writes a push is staler only by
  the other workers' updates, without it by its own one too (mean staleness + 1, exactly).
"""

from __future__ import annotations

import pytest

from mpi_util import SHAKESPEARE_CHAR, check_ok, read_metrics, run_mpi

from hpcps.bench.staleness import simulate
from hpcps.config import load_config

ONE_WORKER_ASP = ["workload=synthetic", "train.optimizer=sgd", "train.momentum=0",
                  "train.weight_decay=0", "train.grad_clip=0", "train.batch_size=1",
                  "train.eval_every=0", "train.peak_flops=1e9", "train.max_steps=40",
                  "synthetic.n_params=257", "ps.mode=asp", "ps.servers=1",
                  "ps.budget=worker_steps"]


def staleness_histogram(mpi_impl, run, *extra) -> list[int]:
    """Pushes by staleness (0, 1, ...) over the whole run, summed from the records."""
    check_ok(run_mpi(2, ["-q", "train", *ONE_WORKER_ASP, *extra, f"out_dir={run}"],
                     mpi_impl, timeout=90))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 41))
    total = [0] * 8
    for record in records:
        for tau, count in enumerate(record.get("staleness_counts") or []):
            total[tau] += count
    return total


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_one_asp_worker_computes_every_push_on_its_own_last_update(mpi_impl, tmp_path):
    fresh = staleness_histogram(mpi_impl, tmp_path / "ryw")
    assert fresh[0] >= 20 and sum(fresh[1:]) == 0, fresh   # (the last pushes may go unrecorded)
    # negative control: pulling at once, the worker usually outruns the server's update of
    # its own push (it pulls right after raising the flag; the server has yet to see it)
    early = staleness_histogram(mpi_impl, tmp_path / "early", "ps.read_your_writes=false")
    assert sum(early[1:]) >= 1, early


def test_simulation_counts_the_own_update_only_without_read_your_writes(shakespeare_corpus):
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8",
            "train.batch_size=2", "train.max_steps=6", "train.eval_steps=1",
            "train.warmup_steps=1", f"data.path={shakespeare_corpus}"]
    stale = {}
    for flag in ("true", "false"):
        cfg = load_config(SHAKESPEARE_CHAR, [*tiny, f"ps.read_your_writes={flag}"])
        stale[flag] = simulate(cfg, 3, [1.0, 1.0, 1.0])["staleness_mean"]
    # 3 equal workers in turn, 6 x 3 pushes: the first round is 0, 1, 2 updates stale, then
    # every push misses the 2 others' updates
    assert stale["true"] == pytest.approx((0 + 1 + 2 + 15 * 2) / 18)
    # without it a worker's own last update is missed too (after its first push)
    assert stale["false"] == pytest.approx((0 + 1 + 2 + 15 * 3) / 18)
