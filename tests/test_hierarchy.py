"""Node-local aggregation (``ps.hierarchy = "node"``) on two fake nodes of 1 server + 2
workers each (``mpi_util``: UTS namespaces, shared memory inside a node, the network
module between nodes), under each MPI:

- bsp with the hierarchy equals bsp without it and one process (rel 1e-5 per step);
- asp and ssp: no update lost (exact integer sums of node means) and the ssp bound;
- kill -9 and resume with the hierarchy on: bit-identical to the uninterrupted run;
- each node's leader moves P x 4 bytes per step for its node; bad layouts: one line, exit 2.
"""

from __future__ import annotations

import signal
import sys

import numpy as np
import pytest
from mpi_util import (
    EXACT_SGD as SGD_BASE,
    IMPLEMENTATIONS,
    SHAKESPEARE_CHAR,
    Job,
    assert_same_run,
    check_ok,
    final_params,
    mismatches,
    mpi_env,
    read_metrics,
    require_implementation,
    run_command,
    run_mpi,
    run_ok,
    tiny_gpt_args,
    train_args,
)

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(300)]

NODES = 2                    # fake nodes of 3 ranks: highest local rank is the server
BATCH = 2
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        "train.max_steps=6", "train.warmup_steps=2", "train.eval_every=0", "train.eval_steps=2",
        "train.peak_flops=1e9", f"train.batch_size={BATCH}", "ps.servers=2"]
EXACT_SGD = [*SGD_BASE, "ps.servers=2", "synthetic.n_params=301"]


@pytest.fixture(params=[f"{impl}+nodes3" for impl in IMPLEMENTATIONS])
def nodes_impl(request) -> str:
    require_implementation(request.param)
    return request.param


def tiny(corpus, run, *extra) -> list[str]:
    return ["-q", *train_args(SHAKESPEARE_CHAR, corpus, run, *TINY, *extra)]


def test_bsp_with_the_hierarchy_equals_without_and_one_process(nodes_impl, tmp_path,
                                                               shakespeare_corpus):
    single = tmp_path / "single"
    check_ok(run_command([sys.executable, "-m", "hpcps", *tiny(shakespeare_corpus, single,
                                                                "ps.mode=single",
                                                                f"train.batch_size={4 * BATCH}")],
                         60, mpi_env("mpich")))
    runs = {}
    for hierarchy in ("none", "node"):
        run = tmp_path / hierarchy
        check_ok(run_mpi(6, tiny(shakespeare_corpus, run, "ps.mode=bsp",
                                 f"ps.hierarchy={hierarchy}"), nodes_impl, timeout=200))
        runs[hierarchy] = read_metrics(run)
        assert mismatches(runs[hierarchy], read_metrics(single)) == []
    assert mismatches(runs["node"], runs["none"]) == []
    # one leader per node: its push and pull are the node's, P x 4 bytes (+ the header)
    last = runs["node"][-1]
    assert last["traffic_scope"] == "node" and "traffic_scope" not in runs["none"][-1]
    assert abs(last["push_mb"] - runs["none"][-1]["push_mb"]) < 1e-9


def node_mean_param_sum(steps: int) -> float:
    """Synthetic worker w pushes (w + 1) * (1 + i % 5); a node pushes its workers' mean:
    nodes {w0, w1} and {w2, w3} push 1.5 and 3.5 times the pattern each step."""
    pattern = sum(1 + i % 5 for i in range(301))
    return -float(steps * (1.5 + 3.5) * pattern)


@pytest.mark.parametrize("mode", ["asp", "ssp"])
def test_async_modes_with_the_hierarchy_lose_no_update(nodes_impl, tmp_path, mode):
    run = tmp_path / "run"
    steps = 40
    check_ok(run_mpi(6, ["-q", "train", *EXACT_SGD, f"ps.mode={mode}", "ps.staleness=1",
                         "ps.hierarchy=node", f"train.max_steps={steps}", f"out_dir={run}"],
                     nodes_impl, timeout=200))
    assert read_metrics(run)[-1]["val_param_sum"] == node_mean_param_sum(steps)


def test_node_mean_negative_control():
    # without the hierarchy every worker's push counts: the expected sum must differ
    pattern = sum(1 + i % 5 for i in range(301))
    assert node_mean_param_sum(40) != -float(40 * (1 + 2 + 3 + 4) * pattern)


def test_kill_and_resume_with_the_hierarchy_is_bit_identical(nodes_impl, tmp_path,
                                                              shakespeare_corpus):
    # a short dead timeout: the survivors end the job themselves even when the MPI library
    # is slow to notice the killed rank (Open MPI over fake nodes once took over 60 s)
    args = ["ps.mode=bsp", "ps.servers=2", "ps.hierarchy=node", "train.max_steps=20",
            "ps.heartbeat_timeout=5", "ps.dead_timeout=15"]
    ref = tmp_path / "ref"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *args)], ref, n=6, impl=nodes_impl,
           timeout=200, name="reference")
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *args)], run, n=6, impl=nodes_impl,
              name="killed")
    job.wait_for_step(8, timeout=150)
    job.signal_rank(1, signal.SIGKILL)   # a worker that is not its node's leader
    assert job.wait(90) != 0, job.output()
    assert job.steps_written() < 20, "the job finished before the kill: nothing was tested"
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *args), run, n=6, impl=nodes_impl,
                     timeout=200, name="resumed")
    assert "resuming from" in resumed.stdout, resumed.output()
    assert_same_run(run, ref)
    np.testing.assert_array_equal(final_params(run), final_params(ref))


def test_a_node_without_a_worker_is_one_line_exit_2(tmp_path, shakespeare_corpus):
    impl = "mpich+nodes1"     # three one-rank nodes, two of them servers
    require_implementation(impl)
    result = run_mpi(3, tiny(shakespeare_corpus, tmp_path / "run", "ps.mode=bsp",
                             "ps.hierarchy=node"), impl, timeout=60)
    assert result.returncode == 2, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("hpcps: error:")]
    assert len(errors) == 1 and "needs a worker on every node" in errors[0], result.stderr
    assert not (tmp_path / "run").exists()
