"""Local steps with an outer optimizer on the servers (``ps.local_steps``, DiLoCo family).

- the outer optimizers: Nesterov equals ``torch.optim.SGD(nesterov=True)`` on the same
  pseudo-gradients; delayed Nesterov over N deltas equals one Nesterov step on their mean
  (naive per-delta Nesterov does not: the negative control);
- 1 worker with outer sgd, lr 1, momentum 0 equals one process (the global params become
  the worker's after every round), under both MPIs;
- W workers with that outer step equal a NumPy reference of parameter averaging every H
  steps, built here from the same model code;
- bytes move only at round ends, one pull and one push of the model per round;
- kill -9 and resume is bit-identical to the uninterrupted run;
- bad combinations: one line, exit 2.
"""

from __future__ import annotations

import math
import signal
import sys

import numpy as np
import pytest
from mpi_util import (
    SHAKESPEARE_CHAR,
    Job,
    assert_one_line_error,
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

from hpcps.optim.outer import CHUNK, DelayedNesterov, Nesterov
from hpcps.train.local_sync import dynamic_round_length

STEPS = 10
BATCH = 2
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
        f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.eval_every=0",
        "train.eval_steps=2", "train.peak_flops=1e9", "checkpoint.every=0"]
AVERAGING = ["ps.outer_optimizer=sgd", "ps.outer_lr=1", "ps.outer_momentum=0"]


def tiny_args(corpus, run_dir, batch: int, *extra) -> list[str]:
    return ["-q", *train_args(SHAKESPEARE_CHAR, corpus, run_dir, *TINY,
                              f"train.batch_size={batch}", *extra)]


def pseudo_gradients(n: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(count)]


# -- the outer optimizers ---------------------------------------------------------------------
def test_nesterov_equals_torch_sgd_nesterov():
    torch = pytest.importorskip("torch")
    n = 2 * CHUNK + 7   # several chunks, the last one short
    start = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    ours, opt = start.copy(), Nesterov(n, 0.9)
    theirs = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ref = torch.optim.SGD([theirs], lr=0.7, momentum=0.9, nesterov=True)
    for g in pseudo_gradients(n, 5):
        opt.step(ours, g, 0.7)
        theirs.grad = torch.from_numpy(g.copy())
        ref.step()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours, start)


@pytest.mark.parametrize("equal", [True, False], ids=["equal", "distinct"])
def test_delayed_nesterov_over_n_deltas_is_one_nesterov_step_on_their_mean(equal):
    n, N, lr, mu = 1000, 4, 0.7, 0.9
    start = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    warm = pseudo_gradients(n, 2 * N, seed=3)   # two full groups first: momentum is not 0
    deltas = pseudo_gradients(n, N, seed=4) if not equal else [pseudo_gradients(n, 1, 5)[0]] * N
    delayed, once = start.copy(), start.copy()
    opt, ref = DelayedNesterov(n, mu, N), Nesterov(n, mu)
    for i in range(0, len(warm), N):
        for g in warm[i:i + N]:
            opt.step(delayed, g, lr)
        ref.step(once, np.mean(warm[i:i + N], axis=0), lr)
    np.testing.assert_allclose(delayed, once, rtol=1e-5, atol=1e-5)
    for g in deltas:
        opt.step(delayed, g, lr)
    ref.step(once, np.mean(deltas, axis=0), lr)
    np.testing.assert_allclose(delayed, once, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(opt.buf, ref.buf, rtol=1e-5, atol=1e-6)
    assert not opt.delay_sum.any()
    # negative control: a Nesterov step per delta moves the momentum N times
    naive, per_delta = start.copy(), Nesterov(n, mu)
    for i in range(0, len(warm), N):
        for g in warm[i:i + N]:
            per_delta.step(naive, g, lr / N)
    for g in deltas:
        per_delta.step(naive, g, lr / N)
    assert np.abs(naive - once).max() > 1e-2


def test_delayed_nesterov_moves_the_params_with_every_delta():
    n = 10
    params = np.zeros(n, np.float32)
    opt = DelayedNesterov(n, 0.9, 4)
    opt.step(params, np.ones(n, np.float32), 0.8)
    np.testing.assert_allclose(params, -0.2)   # lr / N at once, no momentum yet
    assert opt.buf.sum() == 0.0


def test_dynamic_round_length_follows_the_fastest_worker():
    assert dynamic_round_length(20, 0.0, np.array([0.1, 0.2])) == 20      # own speed unknown
    assert dynamic_round_length(20, 0.2, np.array([0.0, 0.0])) == 20      # nobody published
    assert dynamic_round_length(20, 0.2, np.array([0.1, 0.2])) == 10      # 2x slower: half
    assert dynamic_round_length(20, 0.1, np.array([0.1, 0.2])) == 20      # the fastest: H
    assert dynamic_round_length(4, 10.0, np.array([0.1, 10.0])) == 1      # never below 1


# -- one worker, parameter averaging: equals one process ---------------------------------------
@pytest.fixture(scope="module")
def single_run(shakespeare_corpus, tmp_path_factory):
    cache = {}

    def get(batch: int) -> list[dict]:
        if batch not in cache:
            run = tmp_path_factory.mktemp("single")
            cmd = [sys.executable, "-m", "hpcps", *tiny_args(shakespeare_corpus, run, batch),
                   "ps.mode=single"]
            check_ok(run_command(cmd, 60, mpi_env("mpich")))
            cache[batch] = read_metrics(run)
        return cache[batch]
    return get


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_one_worker_with_parameter_averaging_equals_one_process(mpi_impl, tmp_path,
                                                                shakespeare_corpus, single_run):
    run = tmp_path / "run"
    check_ok(run_mpi(2, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=bsp",
                                  "ps.local_steps=4", *AVERAGING), mpi_impl, timeout=90))
    ours = read_metrics(run)
    assert mismatches(ours, single_run(BATCH)) == []
    # rounds of 4, 4 and the 2 steps before the end
    assert [r["step"] for r in ours if r.get("round_steps")] == [4, 8, 10]
    assert [r["round_steps"] for r in ours if r.get("round_steps")] == [4, 4, 2]


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_default_outer_nesterov_differs_from_one_process(tmp_path, shakespeare_corpus, single_run):
    # negative control of the test above: the comparison sees the outer optimizer
    require_implementation("mpich")
    run = tmp_path / "run"
    check_ok(run_mpi(2, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=bsp",
                                  "ps.local_steps=4"), "mpich", timeout=90))
    assert len(mismatches(read_metrics(run), single_run(BATCH))) >= STEPS - 4


# -- W workers, parameter averaging: equals a NumPy reference --------------------------------
def averaging_reference(corpus, workers: int, H: int, batch: int = BATCH,
                        fragments: int = 1, extra=()) -> tuple[list, np.ndarray]:
    """Per-step losses of replica 0 and the final averaged params: W replicas, each with its
    own AdamW on its ``batch`` sequences of every global batch, averaged every H steps and at
    the end; with F ``fragments`` one fragment (in turn) every H / F steps, all at the end."""
    from hpcps.ps.fragments import fragment_ranges
    from hpcps.backend import CPU
    from hpcps.config import load_config
    from hpcps.optim import make_optimizer
    from hpcps.optim.clip import clip_coefficient
    from hpcps.optim.schedule import lr_schedule
    from hpcps.workloads import build_workload
    cfg = load_config(SHAKESPEARE_CHAR, [f"data.path={corpus}", *TINY,
                                         f"train.batch_size={batch}", *extra])
    workload = build_workload(cfg, CPU)
    layout, lr_fn = workload.layout, lr_schedule(cfg)
    global_params = layout.init_slice(cfg.train.seed)
    replicas = [global_params.copy() for _ in range(workers)]
    opts = [make_optimizer(cfg, layout.total, layout.decay_ranges()) for _ in range(workers)]
    grads = layout.new_buffer()
    losses, syncs = [], []
    parts = fragment_ranges(layout, fragments)
    for step in range(STEPS):
        for w in range(workers):
            lo, hi = w * batch, (w + 1) * batch
            data = workload.train_batch(step, lo, hi)
            loss, _ = workload.loss_and_grad(replicas[w], grads, data, step, lo, lambda a, b: None)
            _, scale = clip_coefficient(float(grads @ grads), cfg.train.grad_clip)
            opts[w].step(replicas[w], grads, lr_fn(step), scale)
            if w == 0:
                losses.append(loss)
        if fragments > 1:
            if (step + 1) % (H // fragments) == 0:
                syncs.append(((step + 1) // (H // fragments) - 1) % fragments)
            if step + 1 == STEPS:   # the end syncs whatever drifted (all, in any order)
                syncs.extend(range(fragments))
            for f in syncs:
                for a, b in parts[f]:
                    mean = np.mean([r[a:b] for r in replicas], axis=0, dtype=np.float64)
                    global_params[a:b] = mean.astype(np.float32)
                    for replica in replicas:
                        replica[a:b] = global_params[a:b]
            syncs.clear()
        elif (step + 1) % H == 0 or step + 1 == STEPS:
            global_params = np.mean(replicas, axis=0, dtype=np.float64).astype(np.float32)
            for replica in replicas:
                replica[...] = global_params
    return losses, global_params


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_workers_with_parameter_averaging_equal_a_numpy_reference(mpi_impl, tmp_path,
                                                                  shakespeare_corpus):
    workers, H = 3, 3
    run = tmp_path / "run"
    check_ok(run_mpi(workers + 2, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=bsp",
                                            "ps.servers=2", f"ps.local_steps={H}", *AVERAGING),
                     mpi_impl, timeout=120))
    losses, params = averaging_reference(shakespeare_corpus, workers, H)
    ours = read_metrics(run)
    np.testing.assert_allclose([r["loss"] for r in ours], losses, rtol=1e-5)
    np.testing.assert_allclose(final_params(run), params, rtol=1e-4, atol=1e-6)
    # bytes: one pull and one push of the whole model per round, nothing on inner steps
    pushes = [r["push_mb"] for r in ours]
    assert [i + 1 for i, mb in enumerate(pushes) if mb > 0] == [3, 6, 9, 10]
    n_params = len(params)
    assert pushes[2] == pytest.approx((n_params * 4 + 2 * 64) / 1e6)   # 2 shards' headers
    assert sum(r["pull_mb"] for r in ours) == pytest.approx(4 * n_params * 4 / 1e6)


# -- streaming: fragments sync in turn ---------------------------------------------------------
STREAMING_AVERAGING = ["ps.outer_optimizer=nesterov", "ps.outer_lr=1", "ps.outer_momentum=0"]


@pytest.mark.mpi
@pytest.mark.timeout(150)
def test_streaming_fragments_equal_a_numpy_reference(mpi_impl, tmp_path, shakespeare_corpus):
    workers, H, F = 2, 4, 2
    extra = ["model.n_layer=3"]   # blocks 0, 2 (and the embeddings) in fragment 0, block 1 in 1
    run = tmp_path / "run"
    check_ok(run_mpi(workers + 2, tiny_args(shakespeare_corpus, run, BATCH, *extra, "ps.mode=bsp",
                                            "ps.servers=2", f"ps.local_steps={H}",
                                            f"ps.fragments={F}", *STREAMING_AVERAGING),
                     mpi_impl, timeout=120))
    losses, params = averaging_reference(shakespeare_corpus, workers, H, fragments=F,
                                         extra=extra)
    ours = read_metrics(run)
    np.testing.assert_allclose([r["loss"] for r in ours], losses, rtol=1e-5)
    np.testing.assert_allclose(final_params(run), params, rtol=1e-4, atol=1e-6)
    # one fragment every H / F = 2 steps, in turn; at the end the one not yet synced
    assert [(r["step"], r["fragment"]) for r in ours if "fragment" in r] == \
        [(2, 0), (4, 1), (6, 0), (8, 1), (10, 1)]
    from hpcps.ps.fragments import fragment_ranges
    sizes = [sum(b - a for a, b in f) * 4 for f in fragment_ranges(_layout(shakespeare_corpus, extra), F)]
    assert ours[1]["push_mb"] == pytest.approx((sizes[0] + 2 * 64) / 1e6)
    assert ours[3]["push_mb"] == pytest.approx((sizes[1] + 2 * 64) / 1e6)
    assert ours[1]["pull_mb"] == pytest.approx(sizes[0] / 1e6)   # the fragment pulled back
    assert ours[2]["push_mb"] == ours[2]["pull_mb"] == 0.0      # an inner step moves nothing


def _layout(corpus, extra):
    from hpcps.backend import CPU
    from hpcps.config import load_config
    from hpcps.workloads import build_workload
    return build_workload(load_config(SHAKESPEARE_CHAR, [f"data.path={corpus}", *TINY, *extra]),
                          CPU).layout


def test_fragment_codec_touches_only_its_fragment():
    from hpcps.ps.fragments import FragmentCodec
    n = 300
    ranges = [(3, 70), (150, 290)]
    grad = np.arange(n, dtype=np.float32) - 100.0
    for compression, tolerance in (("none", 0.0), ("bf16", 1.0), ("int4", 20.0)):
        codec = FragmentCodec(n, ranges, compression)
        out = np.zeros(4 * n, dtype=np.uint8)
        nbytes = codec.encode(grad, out)
        assert nbytes == codec.max_payload_bytes
        acc = np.full(n, 7.0, dtype=np.float32)
        codec.decode_add(out[:nbytes], acc, 0.5)
        inside = np.zeros(n, dtype=bool)
        for a, b in ranges:
            inside[a:b] = True
        assert (acc[~inside] == 7.0).all()
        np.testing.assert_allclose(acc[inside], 7.0 + 0.5 * grad[inside], atol=tolerance)
    assert FragmentCodec(n, ranges, "none").max_payload_bytes == (67 + 140) * 4


# -- ps.hierarchy = node: a node's workers are one replica ----------------------------------------
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_one_node_replica_with_parameter_averaging_equals_one_process(
        mpi_impl, tmp_path, shakespeare_corpus, single_run):
    # both workers on this machine's one node: one replica of the global batch
    run = tmp_path / "run"
    check_ok(run_mpi(3, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=bsp",
                                  "ps.hierarchy=node", "ps.local_steps=4", *AVERAGING),
                     mpi_impl, timeout=90))
    ours = read_metrics(run)
    assert mismatches(ours, single_run(2 * BATCH)) == []
    assert ours[3]["push_mb"] > 0 and ours[3]["traffic_scope"] == "node"


@pytest.fixture(params=["mpich+nodes3", "openmpi+nodes3"])
def nodes_impl(request) -> str:
    require_implementation(request.param)
    return request.param


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_node_replicas_with_parameter_averaging_equal_a_numpy_reference(
        nodes_impl, tmp_path, shakespeare_corpus):
    # two fake nodes of 2 workers + 1 server: two replicas of 2 x BATCH sequences each
    H = 3
    run = tmp_path / "run"
    check_ok(run_mpi(6, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=bsp",
                                  "ps.servers=2", "ps.hierarchy=node", f"ps.local_steps={H}",
                                  *AVERAGING), nodes_impl, timeout=200))
    losses, params = averaging_reference(shakespeare_corpus, 2, H, batch=2 * BATCH)
    np.testing.assert_allclose([r["loss"] for r in read_metrics(run)], losses, rtol=1e-5)
    np.testing.assert_allclose(final_params(run), params, rtol=1e-4, atol=1e-6)


# -- kill -9 and resume -----------------------------------------------------------------------
LOCAL = ["ps.mode=bsp", "ps.servers=1", "ps.local_steps=2"]
STREAMING = ["ps.mode=bsp", "ps.servers=1", "ps.local_steps=4", "ps.fragments=2",
             "model.n_layer=2", "ps.compression=int4"]


@pytest.mark.mpi
@pytest.mark.timeout(240)
@pytest.mark.parametrize("local", [LOCAL, STREAMING], ids=["rounds", "streaming-int4"])
def test_kill_then_resume_with_local_steps_is_bit_identical(shakespeare_corpus, tmp_path, local):
    require_implementation("mpich")
    ref = tmp_path / "ref"
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, ref, *local)], ref, n=3, name="reference")
    run = tmp_path / "run"
    job = Job(["-q", *tiny_gpt_args(shakespeare_corpus, run, *local)], run, n=3, name="killed")
    job.wait_for_step(14)
    job.signal_rank(1, signal.SIGKILL)   # a worker, mid-round
    assert job.wait(60) != 0, job.output()
    assert job.steps_written() < 40, "the job finished before the kill: nothing was tested"
    resumed = run_ok(tiny_gpt_args(shakespeare_corpus, run, *local), run, n=3, name="resumed")
    assert "resuming from" in resumed.stdout, resumed.output()
    assert_same_run(run, ref)
    np.testing.assert_array_equal(final_params(run), final_params(ref))


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_resume_on_another_worker_count_starts_fresh_replicas(shakespeare_corpus, tmp_path):
    # 2 workers save their inner AdamW states at step 12; 3 workers resume: each starts from
    # the global params with a fresh inner state (a one-line note says so), the servers keep
    # the global params, the outer momentum and the round count
    require_implementation("mpich")
    run = tmp_path / "run"
    local = ["ps.mode=bsp", "ps.servers=1", "ps.local_steps=4", "checkpoint.every=12"]
    run_ok(["-q", *tiny_gpt_args(shakespeare_corpus, run, *local, "train.max_steps=12")], run, n=3)
    from hpcps.checkpoint import open_checkpoint
    saved = final_params(run)
    assert open_checkpoint(str(run)).manifest["shards"][0]["version"] == 3   # rounds, not steps
    job = run_ok(tiny_gpt_args(shakespeare_corpus, run, *local, "train.max_steps=20"), run, n=4)
    assert "resuming from" in job.stdout and "start fresh" in job.output(), job.output()
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 21))
    # step 13's loss is the saved global params' on the new first worker's batch: close to
    # step 12's (the same params, another batch), far from a fresh model's ln 65 = 4.17
    assert abs(records[12]["loss"] - records[11]["loss"]) < 0.3 < 4.17 - records[12]["loss"]
    manifest = open_checkpoint(str(run)).manifest
    assert (manifest["n_workers"], manifest["shards"][0]["version"]) == (3, 5)
    assert not np.array_equal(saved, final_params(run))


# -- asp ---------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_asp_local_steps_apply_every_sample_once(tmp_path, shakespeare_corpus):
    require_implementation("mpich")
    run = tmp_path / "run"
    check_ok(run_mpi(3, tiny_args(shakespeare_corpus, run, BATCH, "ps.mode=asp",
                                  "ps.local_steps=3", "train.eval_every=10"), "mpich",
                     timeout=90))
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["val_loss"] < 4.0   # trained from ln 65 = 4.17
    assert sum(r["push_mb"] for r in records) > 0


# -- bad combinations ----------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra,fragments", [
    (["ps.mode=ssp", "ps.local_steps=4"], ("ps.local_steps = 4", "ps.mode = ssp")),
    (["ps.mode=allreduce", "ps.local_steps=4"], ("ps.mode = allreduce",)),
    (["ps.mode=bsp", "ps.local_steps=4", "ps.outer_buffer=2"], ("ps.outer_buffer", "bsp")),
    (["ps.mode=asp", "ps.local_steps=4", "ps.delay_compensation=dc"], ("dc",)),
    (["ps.mode=bsp", "ps.outer_lr=0.5"], ("ps.outer_lr", "ps.local_steps")),
    (["ps.mode=bsp", "ps.local_steps=-1"], ("ps.local_steps",)),
    (["ps.mode=bsp", "ps.local_steps=4", "ps.outer_lr=0"], ("ps.outer_lr",)),
    (["ps.mode=bsp", "ps.local_steps=4", "ps.outer_momentum=1"], ("ps.outer_momentum",)),
    (["ps.mode=asp", "ps.local_steps=4", "ps.fragments=2", "model.n_layer=2"],
     ("ps.fragments = 2", "bsp")),
    (["ps.mode=bsp", "ps.local_steps=5", "ps.fragments=2", "model.n_layer=2"],
     ("multiple of F",)),
    (["ps.mode=bsp", "ps.local_steps=4", "ps.fragments=2"], ("1 blocks",)),
    (["ps.mode=bsp", "ps.local_steps=4", "ps.fragments=2", "model.n_layer=2",
      "ps.compression=topk"], ("topk",)),
    (["ps.mode=bsp", "ps.fragments=2", "model.n_layer=2"], ("ps.fragments", "ps.local_steps")),
], ids=["ssp", "allreduce", "buffer-bsp", "dc", "outer-without-local",
        "negative-H", "zero-lr", "momentum-1", "fragments-asp", "fragments-divide",
        "fragments-blocks", "fragments-topk", "fragments-without-local"])
def test_bad_local_steps_settings_are_one_line(tmp_path, shakespeare_corpus, extra, fragments):
    require_implementation("mpich")
    proc = run_mpi(3, tiny_args(shakespeare_corpus, tmp_path / "run", BATCH, *extra), "mpich",
                   timeout=60)
    assert_one_line_error(proc, *fragments)


# -- the benchmark behind docs/benchmarks.md's local-steps table (smoke) -------------------------
@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_bench_train_local_experiment_reports_every_part(shakespeare_corpus):
    import json
    from mpi_util import mpich_mpirun
    require_implementation("mpich")
    cmd = [sys.executable, "-m", "hpcps", "bench", "train", f"data.path={shakespeare_corpus}",
           "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=16",
           "train.batch_size=2", "train.eval_steps=1", "--experiments", "local",
           "--local-total", "8", "--local-h", "4", "--local-lr", "0.7", "--local-int4-h", "4",
           "--local-fragments", "2", "--throttle-steps", "8", "--local-throttle-h", "4",
           "--link-gbps", "0.01", "--straggler-workers", "2", "--local-straggler-steps", "8",
           "--local-straggler-h", "2", "--repeats", "1", "--mpirun", mpich_mpirun(), "--json"]
    report = json.loads(check_ok(run_command(cmd, 220, mpi_env("mpich"))).stdout)["local"]
    rows = {r["run"]: r for r in report["quality"]}
    assert list(rows) == ["bsp", "H=4 lr=0.7", "H=4 lr=0.7 int4", "H=4 lr=0.7 F=2",
                          "H=4 lr=0.7 F=2 int4"]
    assert rows["H=4 lr=0.7"]["push_reduction"] == pytest.approx(4.0, rel=0.01)
    assert rows["H=4 lr=0.7 int4"]["push_reduction"] > 4 * 6   # int4: ~7x fewer bytes
    assert all(math.isfinite(r["val_loss"]) for r in rows.values())
    # 8 steps of ~25 KB pulls and pushes at 0.01 Gb/s: ~0.3 s per step for bsp
    assert report["throttled"]["speedup"] > 1.5
    assert set(report["straggler"]["runs"]) == {"bsp", "bsp H=2", "asp H=2", "asp H=2 naive"}


def test_plan_predicts_local_steps_on_the_cluster(capsys):
    from train_util import cli
    code, out, err = cli(capsys, "plan", "configs/gpt2_124m.toml", "--ranks", "320", "--nodes",
                         "64")
    assert code == 0, err
    # bsp stays communication-bound: the advice names local steps with their compute share
    assert "local steps sync once per H steps (ps.local_steps=50: 83 ms per step, compute 89 %" \
        in out
    code, out, err = cli(capsys, "plan", "configs/gpt2_124m.toml", "--ranks", "320", "--nodes",
                         "64", "ps.mode=bsp", "ps.local_steps=50", "ps.hierarchy=node")
    assert code == 0, err
    # docs/scaling.md's local-steps column: 78.6 ms, 93 % (the plan's compute is 74 ms)
    assert "with ps.local_steps=50: 79 ms per inner step, compute share 93 %" in out
