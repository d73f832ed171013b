"""Skip-gram with negative sampling: float64 gradient checks with negative controls,
the pair sampler (a pure function of (seed, step, item)), subsampling, sparse rows,
a short training run that beats the initial (unigram-free) loss, and ``hpcps embed``."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from gradcheck import assert_fails, check_layer_grad
from mpi_util import check_ok, mpi_env, read_metrics, run_command

from hpcps.cli import main as hpcps_main
from hpcps.config.load import load_config
from hpcps.model import skipgram as sg
from hpcps.workloads.skipgram import (
    PairSampler,
    init_loss,
    keep_probability,
    negative_cdf,
    subsample,
)

pytestmark = pytest.mark.timeout(120)


# -- the negative-sampling layer ----------------------------------------------------------

def _sgns_loss(backward):
    def forward_loss(p):
        loss, cache = sg.sgns_forward(p["u"], p["v"])
        du, dv = backward(cache)
        return float(loss), {"u": du, "v": dv}
    return forward_loss


def _params(rng, B=5, k=3, d=4):
    return {"u": rng.standard_normal((B, d)), "v": rng.standard_normal((B, 1 + k, d))}


def test_sgns_layer_grad():
    report = check_layer_grad(_sgns_loss(sg.sgns_backward), _params(np.random.default_rng(0)))
    assert report.ok, report


def test_sgns_negative_control_forgets_the_sign_of_negatives():
    def wrong(cache):
        u, v, scores = cache
        ds = -sg.sigmoid(-scores) / u.shape[0]              # no sign flip for the negatives
        return np.einsum("bj,bjd->bd", ds, v), ds[:, :, None] * u[:, None, :]
    assert_fails(check_layer_grad(_sgns_loss(wrong), _params(np.random.default_rng(0))))


def test_sgns_loss_value_and_extreme_scores():
    u = np.array([[1.0, 0.0]])
    v = np.array([[[2.0, 0.0], [-1.0, 0.0]]])               # context score 2, negative -1
    expected = -math.log(1 / (1 + math.exp(-2))) - math.log(1 / (1 + math.exp(-1)))
    assert float(sg.sgns_forward(u, v)[0]) == pytest.approx(expected, rel=1e-12)
    big = np.array([[[1e4, 0.0], [-1e4, 0.0]]]).astype(np.float32)
    loss, cache = sg.sgns_forward(np.array([[1.0, 0.0]], np.float32), big)
    du, dv = sg.sgns_backward(cache)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(du)) and np.all(np.isfinite(dv))


# -- the model on the flat buffer ---------------------------------------------------------

CENTERS = np.array([1, 4, 1, 0, 6])                     # repeated center rows must sum
TARGETS = np.array([[2, 1, 5], [3, 3, 0], [4, 2, 2], [1, 6, 4], [0, 1, 2]])


def _model_loss(model, scatter=None):
    def forward_loss(p):
        grads = np.zeros_like(p["flat"])
        if scatter is None:
            loss = model.forward_backward(p["flat"], grads, CENTERS, TARGETS)
        else:
            loss = scatter(p["flat"], grads)
        return loss, {"flat": grads}
    return forward_loss


def test_skipgram_model_grad_with_repeated_rows():
    model = sg.SkipGram(7, 3)
    flat = np.random.default_rng(1).standard_normal(model.layout.total)
    report = check_layer_grad(_model_loss(model), {"flat": flat})
    assert report.ok, report


def test_skipgram_model_negative_control_counts_repeated_rows_once():
    model = sg.SkipGram(7, 3)

    def buffered(params, grads):                         # g[rows] += x keeps only one repeat
        emb_in, emb_out = model._tables(params)
        u, v = emb_in[CENTERS], emb_out[TARGETS]
        loss, cache = sg.sgns_forward(u, v)
        du, dv = sg.sgns_backward(cache)
        g_in, g_out = model._tables(grads)
        g_in[CENTERS] += du
        g_out[TARGETS.reshape(-1)] += dv.reshape(-1, 3)
        return float(loss)
    flat = np.random.default_rng(1).standard_normal(model.layout.total)
    assert_fails(check_layer_grad(_model_loss(model, buffered), {"flat": flat}))


def test_forward_backward_overwrites_and_touches_only_batch_rows():
    model = sg.SkipGram(7, 3)
    params = np.random.default_rng(2).standard_normal(model.layout.total).astype(np.float32)
    grads = np.full_like(params, 123.0)                  # stale values must disappear
    model.forward_backward(params, grads, CENTERS, TARGETS)
    g_in, g_out = model._tables(grads)
    assert set(np.flatnonzero(np.abs(g_in).sum(axis=1))) == set(CENTERS.tolist())
    assert set(np.flatnonzero(np.abs(g_out).sum(axis=1))) == set(TARGETS.reshape(-1).tolist())


def test_layout_is_two_sparse_tables_without_decay_and_zero_output_init():
    lay = sg.build_layout(11, 4)
    assert [s.name for s in lay.specs] == ["emb_in", "emb_out"]
    assert all(s.sparse_rows and not s.decay for s in lay.specs)
    init = lay.views(lay.init_slice(0))
    assert np.all(init["emb_out"] == 0) and init["emb_in"].std() == pytest.approx(0.5, rel=0.3)


def test_cosine_neighbours():
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert [i for i, _ in sg.cosine_neighbours(vectors, 0, 2)] == [1, 2]
    allowed = np.array([True, False, True, True])
    assert [i for i, _ in sg.cosine_neighbours(vectors, 0, 3, allowed)] == [2, 3]


# -- pair sampling ------------------------------------------------------------------------

def _sampler(n=500, window=4, k=3, vocab=None, seed=7):
    seq = np.arange(n) if vocab is None else np.arange(n) % vocab
    counts = np.bincount(seq, minlength=vocab or n)
    return PairSampler(seq, window, k, negative_cdf(counts, 0.75), seed, 0)


def test_batches_are_a_pure_function_of_step_and_item():
    s = _sampler()
    whole = s.batch(3, 0, 12)
    parts = [s.batch(3, a, b) for a, b in ((0, 5), (5, 6), (6, 12))]
    for i in range(2):
        assert np.array_equal(whole[i], np.concatenate([p[i] for p in parts]))
    assert not np.array_equal(whole[0], s.batch(4, 0, 12)[0])           # steps differ
    assert not np.array_equal(whole[0], _sampler(seed=8).batch(3, 0, 12)[0])


def test_contexts_lie_inside_the_window_and_near_ones_are_likelier():
    s = _sampler(n=300, window=4)                       # token id == position
    centers, targets = s.batch(0, 0, 20000)
    dist = np.abs(targets[:, 0] - centers)
    assert dist.min() == 1 and dist.max() == 4
    freq = np.bincount(dist, minlength=5)[1:] / len(dist)
    # r ~ U{1..4}, |offset| ~ U{1..r}: P(1) = (1 + 1/2 + 1/3 + 1/4) / 4
    expected = [sum(1 / r for r in range(d, 5)) / 4 for d in range(1, 5)]
    assert np.allclose(freq, expected, atol=0.015)


def test_negatives_follow_unigram_to_the_power_and_skip_unseen_tokens():
    counts = np.array([100, 0, 25, 400, 1])
    cdf = negative_cdf(counts, 0.75)
    s = PairSampler(np.array([0, 2, 3, 4, 0, 2, 3, 0, 3, 3]), 2, 5, cdf, 1, 0)
    negatives = s.batch(0, 0, 40000)[1][:, 1:].reshape(-1)
    freq = np.bincount(negatives, minlength=5) / negatives.size
    expected = counts ** 0.75 / (counts ** 0.75).sum()
    assert freq[1] == 0
    assert np.allclose(freq, expected, atol=0.006)


def test_keep_probability_and_subsampling():
    counts = np.array([9000, 900, 90, 10, 0])
    keep = keep_probability(counts, 1e-2)
    f = counts[:4] / counts.sum()
    expected = np.minimum((np.sqrt(f / 1e-2) + 1) * 1e-2 / f, 1.0)
    assert np.allclose(keep[:4], expected) and keep[4] == 1.0 and keep[3] == 1.0
    assert np.all(keep_probability(counts, 0.0) == 1.0)
    tokens = np.repeat(np.arange(4), counts[:4])
    kept = subsample(tokens, keep, seed=3, split_index=0)
    assert np.array_equal(kept, subsample(tokens, keep, seed=3, split_index=0))
    observed = np.bincount(kept, minlength=4) / counts[:4]
    assert np.allclose(observed, keep[:4], atol=0.03)


# -- the workload: init loss, sparse rows, training ---------------------------------------

def _workload(corpus_path, *overrides):
    from hpcps.backend import CPU
    from hpcps.workloads import build_workload
    cfg = load_config(None, ["workload=skipgram", f"data.path={corpus_path}", "skipgram.dim=16",
                             "skipgram.window=3", "skipgram.negatives=4", *overrides])
    return cfg, build_workload(cfg, CPU)


def test_init_loss_is_k_plus_one_log_two_and_touched_rows_match(shakespeare_corpus):
    cfg, wl = _workload(shakespeare_corpus)
    params = wl.layout.init_slice(cfg.train.seed)
    metrics = wl.finalize_eval(wl.eval_sums(params, 0, 1000))
    assert metrics["val_loss"] == pytest.approx(init_loss(4), rel=1e-6)
    batch = wl.train_batch(0, 0, 64)
    rows = wl.touched_rows(batch)
    params = np.random.default_rng(0).standard_normal(wl.layout.total).astype(np.float32)
    grads = wl.layout.new_buffer()
    loss, weight = wl.loss_and_grad(params, grads, batch, 0, 0)
    assert weight == 64.0 and np.isfinite(loss)
    views = wl.layout.views(grads)
    for name in ("emb_in", "emb_out"):
        assert np.array_equal(np.flatnonzero(np.abs(views[name]).sum(axis=1)), rows[name])


def test_workload_rejects_a_split_shorter_than_the_window(make_corpus):
    from hpcps.errors import UserError
    tiny = make_corpus("abcdefghij" * 2, val_fraction=0.2)       # val: 4 tokens
    with pytest.raises(UserError, match="fewer than 2 \\* skipgram.window"):
        _workload(tiny)


@pytest.fixture(scope="module")
def trained_run(shakespeare_corpus, tmp_path_factory):
    """A short single-process training run on character-level Shakespeare."""
    run = tmp_path_factory.mktemp("skipgram_run")
    cmd = [sys.executable, "-m", "hpcps", "-q", "train", "configs/skipgram.toml",
           f"data.path={shakespeare_corpus}", f"out_dir={run}", "skipgram.dim=32",
           "train.batch_size=256", "train.max_steps=150", "train.eval_every=0",
           "train.eval_steps=4", "train.warmup_steps=10", "train.peak_flops=1e9"]
    check_ok(run_command(cmd, 100, mpi_env("mpich")))
    return run


def test_short_training_beats_the_initial_loss_by_a_clear_margin(trained_run):
    last = read_metrics(trained_run)[-1]
    k = 5
    assert last["step"] == 150
    assert last["val_loss"] < 0.8 * init_loss(k), last          # init: 6 log 2 = 4.16
    assert last["val_pair_accuracy"] > 1.4 / (k + 1), last       # chance: 1 / (k + 1)


def test_embed_writes_word2vec_text_and_neighbours(trained_run, tmp_path, capsys, real_shakespeare):
    out = tmp_path / "vectors.txt"
    assert hpcps_main(["embed", str(trained_run), "-o", str(out), "--neighbours", "e", "▁",
                       "--top", "3"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "65 32" and len(lines) == 66
    names = [line.split(" ")[0] for line in lines[1:]]
    assert len(set(names)) == 65 and "\\n" in names and "▁" in names and "e" in names
    assert all(len(line.split(" ")) == 33 for line in lines[1:])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].startswith("e: ") and len(printed[-2].split(", ")) == 3
    assert printed[-1].startswith("▁: ")


def test_embed_rejects_unknown_words_and_missing_checkpoints(trained_run, tmp_path, capsys):
    out = tmp_path / "v.txt"
    assert hpcps_main(["embed", str(trained_run), "-o", str(out), "--neighbours", "ab"]) == 2
    assert "is 2 tokens, not one" in capsys.readouterr().err
    assert not out.exists()
    assert hpcps_main(["embed", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
