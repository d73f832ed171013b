"""Delay compensation (``ps.delay_compensation``): the servers' update-rule plug-in.

- each rule on small arrays, exact values: none, lr (learning rate / tau), dc (DC-ASGD,
  adaptive with AdamW's second moment), gap (Gap-Aware), lookahead (pulls extrapolated
  along the last update by the mean staleness), and the ring of past versions dc and
  gap read (with its clamp to the oldest version kept);
- the memory the rules keep, as the start-up table reports it for a real job;
- a real asp job with every rule trains (finite val loss, stale pushes corrected), and
  the one-process simulation behind the benchmark runs;
- bad input: one line, exit 2.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from mpi_util import (REPO_ROOT, SHAKESPEARE_CHAR, check_ok, final_params, read_metrics, run_mpi,
                      train_args)

from hpcps.backend import CPU
from hpcps.bench.staleness import simulate
from hpcps.config import load_config
from hpcps.optim.adamw import AdamW
from hpcps.workloads import build_workload
from hpcps.ps.update_rules import (DelayCompensated, GapAware, LookAhead, NoCompensation,
                                   ParamsHistory, StalenessLR, make_update_rule, rule_memory_bytes)


def f32(*values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_no_compensation_and_staleness_lr():
    grad = f32(1.0, -2.0)
    assert NoCompensation().correct(grad, 3, 7, f32(0, 0)) == 1.0
    assert grad.tolist() == [1.0, -2.0]
    rule = StalenessLR()
    assert rule.correct(grad, 3, 7, f32(0, 0)) == 0.25        # tau = 4
    assert rule.correct(grad, 7, 7, f32(0, 0)) == 1.0         # fresh
    assert grad.tolist() == [1.0, -2.0]


def test_history_keeps_the_last_versions_and_clamps_older_ones():
    history = ParamsHistory(2, keep=3)
    for version in range(5):
        history.store(version, f32(version, -version))
    assert history.at(4).tolist() == [4.0, -4.0]
    assert history.at(2).tolist() == [2.0, -2.0]
    assert history.at(1).tolist() == [2.0, -2.0]   # older than kept: the oldest kept (2)
    assert history.ring.nbytes == 3 * 2 * 4


def test_dc_without_second_moment_is_plain_dc_asgd():
    rule = DelayCompensated(3, keep=4, lam=0.5)
    rule.started(0, f32(1.0, 1.0, 1.0))
    rule.applied(1, f32(2.0, 0.0, 1.0))
    grad = f32(2.0, 3.0, 4.0)
    # g + 0.5 * g*g * (w - w_pulled), w - w_pulled = (1, -1, 0)
    assert rule.correct(grad, 0, 1, f32(2.0, 0.0, 1.0)) == 1.0
    assert grad.tolist() == [2.0 + 0.5 * 4 * 1, 3.0 - 0.5 * 9 * 1, 4.0]
    fresh = f32(2.0, 3.0, 4.0)
    rule.correct(fresh, 1, 1, f32(2.0, 0.0, 1.0))
    assert fresh.tolist() == [2.0, 3.0, 4.0]        # computed on the current params


def test_dc_with_adamw_divides_by_the_root_of_the_next_second_moment():
    opt = AdamW(2, [], beta2=0.75)
    opt.v[:] = f32(4.0, 0.0)
    rule = DelayCompensated(2, keep=2, lam=1.0, optimizer=opt)
    rule.started(0, f32(0.0, 0.0))
    rule.applied(1, f32(0.5, 2.0))
    grad = f32(2.0, 2.0)
    rule.correct(grad, 0, 1, f32(0.5, 2.0))
    # v' = 0.75 v + 0.25 g*g = (4, 1); correction = g*g * dw / sqrt(v') = (4*0.5/2, 4*2/1)
    np.testing.assert_allclose(grad, [2.0 + 1.0, 2.0 + 8.0], rtol=1e-6)


def test_gap_divides_by_the_gap_in_mean_updates():
    rule = GapAware(3, keep=4)
    rule.started(0, f32(0.0, 0.0, 0.0))
    rule.applied(1, f32(1.0, 1.0, 1.0))      # first update: mean size 1 per element
    rule.applied(2, f32(2.0, 1.0, 3.0))      # sizes (1, 0, 2): mean 0.9*1 + 0.1*size
    np.testing.assert_allclose(rule.mean_step, [1.0, 0.9, 1.1], rtol=1e-6)
    grad = f32(6.0, 6.0, 6.0)
    rule.correct(grad, 0, 2, f32(2.0, 1.0, 3.0))
    # gap |w - w_0| / mean = (2/1, 1/0.9, 3/1.1): divide by max(1, gap)
    np.testing.assert_allclose(grad, [3.0, 6.0 / (1 / 0.9), 6.0 / (3 / 1.1)], rtol=1e-6)


def test_lookahead_publishes_the_params_extrapolated_by_the_mean_staleness():
    rule = LookAhead(2)
    rule.started(0, f32(1.0, 2.0))
    assert rule.own.tolist() == [1.0, 2.0] and rule.private_params
    for _ in range(20):                       # pushes 4 updates stale: tau -> 4
        rule.correct(f32(0, 0), 0, 4, rule.own)
    assert rule.tau == pytest.approx(4 * (1 - 0.95 ** 20))
    rule.tau = 0.5
    window = f32(1.0, 2.0)                    # the params before the update ...
    rule.publish(window, f32(2.0, 0.0))       # ... and after it
    assert window.tolist() == [2.5, -1.0]     # w + 0.5 (w - w_previous)


def test_rules_negative_control():
    # a push two updates stale is really changed by dc and gap (the tests above can fail)
    for rule in (DelayCompensated(2, keep=3, lam=1.0), GapAware(2, keep=3)):
        rule.started(0, f32(0.0, 0.0))
        rule.applied(1, f32(1.0, -1.0))
        rule.applied(2, f32(2.0, -2.0))
        grad = f32(1.0, 1.0)
        rule.correct(grad, 0, 2, f32(2.0, -2.0))
        assert grad.tolist() != [1.0, 1.0], rule.name


@pytest.mark.parametrize("kind", ["none", "lr", "dc", "gap", "lookahead"])
def test_memory_formula_matches_what_the_rule_keeps(kind):
    cfg = load_config(None, [f"ps.delay_compensation={kind}", "ps.dc_versions=auto"])
    n, workers = 100_000, 4
    rule = make_update_rule(cfg, n, workers, AdamW(n, []))
    assert rule.memory_bytes() == rule_memory_bytes(cfg, n, workers)
    if kind in ("dc", "gap"):   # 2W + 2 versions of 4 bytes per element
        assert rule.history.ring.nbytes == (2 * workers + 2) * 4 * n
    if kind == "lookahead":     # one private copy of the shard
        assert rule.memory_bytes() == 4 * n


# -- jobs ------------------------------------------------------------------------------------------
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.warmup_steps=2", "train.eval_every=0", "train.eval_steps=2",
        "train.peak_flops=1e9", "train.batch_size=2", "train.max_steps=30", "ps.servers=1"]


def memory_line(stdout: str) -> dict:
    line = next(x for x in stdout.splitlines() if x.startswith("memory per rank"))
    return {int(r): float(m) for r, m in re.findall(r"r(\d+):\w=([\d.]+)MiB", line)}


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_every_rule_trains_an_asp_job(tmp_path, shakespeare_corpus):
    memory, val = {}, {}
    for kind in ("none", "lr", "dc", "gap", "lookahead"):
        run = tmp_path / kind
        result = check_ok(run_mpi(4, train_args(SHAKESPEARE_CHAR, shakespeare_corpus, run, *TINY,
                                                "ps.mode=asp", "ps.straggler=1:3",
                                                f"ps.delay_compensation={kind}"),
                                  "mpich", timeout=100))
        records = read_metrics(run)
        assert [r["step"] for r in records] == list(range(1, 31))
        assert max(r.get("staleness_max", 0) for r in records) >= 1
        val[kind] = records[-1]["val_loss"]
        memory[kind] = memory_line(result.stdout)[3]   # rank 3: the server
    assert all(math.isfinite(v) and v < 4.0 for v in val.values()), val
    # dc and gap keep 2W + 2 = 8 versions of the shard; lr and none nothing
    assert memory["lr"] == memory["none"]
    assert memory["dc"] >= memory["none"] + 0.3 and memory["gap"] >= memory["none"] + 0.3


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_lookahead_saves_and_shows_the_true_params_at_sync_points(tmp_path, shakespeare_corpus):
    """Workers pull extrapolated params while training; at the end the servers publish
    the true ones: the lead's final evaluation is the checkpoint's params' val loss."""
    run = tmp_path / "run"
    check_ok(run_mpi(4, ["-q", *train_args(SHAKESPEARE_CHAR, shakespeare_corpus, run, *TINY,
                                           "ps.mode=asp", "ps.delay_compensation=lookahead",
                                           "checkpoint.every=10")], "mpich", timeout=100))
    final = read_metrics(run)[-1]["val_loss"]
    cfg = load_config(str(run / "config.toml"))
    workload = build_workload(cfg, CPU)
    params = final_params(run)
    sums = workload.eval_sums(params, 0, cfg.train.eval_steps * 3 * cfg.train.batch_size)
    assert workload.finalize_eval(sums)["val_loss"] == pytest.approx(final, rel=1e-6)
    # negative control: params one extrapolation away give another val loss
    moved = params * np.float32(1.001)
    sums = workload.eval_sums(moved, 0, cfg.train.eval_steps * 3 * cfg.train.batch_size)
    assert workload.finalize_eval(sums)["val_loss"] != pytest.approx(final, rel=1e-6)


def test_the_simulation_runs_every_rule(shakespeare_corpus):
    config = str(REPO_ROOT / SHAKESPEARE_CHAR)
    base = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16",
            "train.batch_size=2", "train.max_steps=6", "train.eval_steps=1",
            f"data.path={shakespeare_corpus}"]
    results = {}
    for kind in ("none", "dc", "gap", "lr", "lookahead"):
        cfg = load_config(config, [*base, f"ps.delay_compensation={kind}"])
        results[kind] = simulate(cfg, 3, [1.0, 1.0, 2.0])
        assert results[kind]["staleness_max"] >= 2
    bsp = simulate(load_config(config, base), 3, [1.0, 1.0, 2.0], mode="bsp")
    assert "staleness_mean" not in bsp and math.isfinite(bsp["val_loss"])
    assert len({round(r["val_loss"], 9) for r in results.values()}) == 5   # five rules differ


@pytest.mark.mpi
@pytest.mark.timeout(60)
def test_unknown_compensation_is_one_line_exit_2(tmp_path, shakespeare_corpus):
    run = tmp_path / "run"
    result = run_mpi(3, ["-q", *train_args(SHAKESPEARE_CHAR, shakespeare_corpus, run, *TINY,
                                           "ps.mode=asp", "ps.delay_compensation=taylor")],
                     "mpich", timeout=50)
    errors = [x for x in result.stderr.splitlines() if x.strip()]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert ("config key 'ps.delay_compensation': 'taylor' is not one of none, dc, gap, lr, "
            "lookahead" in errors[0]), errors
    assert not run.exists()
