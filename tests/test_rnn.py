"""RNN classifier: float64 gradient checks of the LSTM, GRU and pooling layers and of
the whole model (each with a negative control), masking / padding exactness,
truncated BPTT, the workload's metrics, and a short training run that beats the
majority-class baseline."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from gradcheck import assert_fails, check_layer_grad, projection
from mpi_util import check_ok, mpi_env, read_metrics, run_command
from synthetic_corpora import make_classification_corpus

from hpcps.config.load import load_config
from hpcps.errors import UserError
from hpcps.model import rnn

pytestmark = pytest.mark.timeout(120)

T, B, E, H = 6, 3, 4, 5
LENGTHS = np.array([6, 3, 1])                           # full, padded, a single token


def _mask(lengths=LENGTHS, steps=T):
    return (np.arange(steps)[:, None] >= (steps - lengths)[None, :]).astype(np.float64)


def _cell_params(cell, seed=0):
    rng = np.random.default_rng(seed)
    g = rnn.GATES[cell] * H
    p = {"x": rng.standard_normal((T, B, E)), "wx": 0.5 * rng.standard_normal((g, E)),
         "wh": 0.5 * rng.standard_normal((g, H))}
    if cell == "lstm":
        p["b"] = 0.5 * rng.standard_normal(g)
    else:
        p["bx"], p["bh"] = 0.5 * rng.standard_normal(g), 0.5 * rng.standard_normal(g)
    return p


def _cell_loss(cell, backward=None, bptt=0, mask=None):
    r = projection((T, B, H))
    mask = _mask() if mask is None else mask
    forward = rnn.lstm_forward if cell == "lstm" else rnn.gru_forward
    backward = backward or (rnn.lstm_backward if cell == "lstm" else rnn.gru_backward)
    bias_names = ("b",) if cell == "lstm" else ("bx", "bh")

    def forward_loss(p):
        h, cache = forward(p["x"], mask, p["wx"], p["wh"], *(p[n] for n in bias_names))
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        grads["x"] = backward(r, cache, grads["wx"], grads["wh"],
                              *(grads[n] for n in bias_names), bptt=bptt)
        return float((h[1:] * r).sum()), grads
    return forward_loss


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_recurrent_cell_grad_with_padding(cell):
    report = check_layer_grad(_cell_loss(cell), _cell_params(cell))
    assert report.ok, report


def test_lstm_negative_control_drops_the_forget_gate_on_the_cell_path():
    def wrong(dh_out, cache, dwx, dwh, db, bptt=0):
        x, mask, wx, wh, h, c, acts, tanh_c = cache
        acts = acts.copy()
        acts[:, :, H:2 * H] = 1.0                       # as if the cell gradient skipped f
        return rnn.lstm_backward(dh_out, (x, mask, wx, wh, h, c, acts, tanh_c), dwx, dwh, db)
    assert_fails(check_layer_grad(_cell_loss("lstm", wrong), _cell_params("lstm")))


def test_gru_negative_control_forgets_the_reset_gate_on_the_candidate():
    def wrong(dh_out, cache, dwx, dwh, dbx, dbh, bptt=0):
        x, mask, wx, wh, h, acts, hn = cache
        acts = acts.copy()
        acts[:, :, :H] = 1.0                            # r treated as 1 in the backward
        return rnn.gru_backward(dh_out, (x, mask, wx, wh, h, acts, hn), dwx, dwh, dbx, dbh)
    assert_fails(check_layer_grad(_cell_loss("gru", wrong), _cell_params("gru")))


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_masking_ignores_the_padded_steps_exactly(cell):
    p = _cell_params(cell)
    forward = rnn.lstm_forward if cell == "lstm" else rnn.gru_forward
    biases = [p["b"]] if cell == "lstm" else [p["bx"], p["bh"]]
    h, _ = forward(p["x"], _mask(), p["wx"], p["wh"], *biases)
    x2 = p["x"].copy()
    x2[:3, 1] = 1e3                                     # garbage in row 1's padding
    h2, _ = forward(x2, _mask(), p["wx"], p["wh"], *biases)
    assert np.array_equal(h, h2)
    assert np.all(h[:4, 1] == 0)                        # zero state until the string starts
    # the same string alone, unpadded: the same final state
    alone, _ = forward(p["x"][3:, 1:2], np.ones((3, 1)), p["wx"], p["wh"], *biases)
    assert np.allclose(alone[-1, 0], h[-1, 1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell", rnn.CELLS)
def test_truncated_bptt(cell):
    p = _cell_params(cell)
    full = _cell_loss(cell)(p)[1]
    assert all(np.array_equal(full[k], v) for k, v in _cell_loss(cell, bptt=T)(p)[1].items())
    # only the last state matters: input gradients of the last k steps are exact, earlier 0
    r_last = np.zeros((T, B, H))
    r_last[-1] = projection((B, H))
    forward = rnn.lstm_forward if cell == "lstm" else rnn.gru_forward
    backward = rnn.lstm_backward if cell == "lstm" else rnn.gru_backward
    biases = ["b"] if cell == "lstm" else ["bx", "bh"]
    h, cache = forward(p["x"], np.ones((T, B)), p["wx"], p["wh"], *(p[b] for b in biases))

    def dx(bptt):
        g = {k: np.zeros_like(v) for k, v in p.items()}
        return backward(r_last, cache, g["wx"], g["wh"], *(g[b] for b in biases), bptt=bptt), g
    dx_full, g_full = dx(0)
    dx_cut, g_cut = dx(2)
    assert np.array_equal(dx_cut[-2:], dx_full[-2:])
    assert np.all(dx_cut[:-2] == 0) and np.abs(dx_full[:-2]).max() > 1e-3
    assert not np.allclose(g_cut["wh"], g_full["wh"])
    assert rnn.bptt_cuts(7, 3) == {3, 0} and rnn.bptt_cuts(7, 0) == set()


@pytest.mark.parametrize("pool", rnn.POOLS)
def test_pool_grad(pool):
    mask, lengths = _mask(), LENGTHS.astype(np.float64)
    r = projection((B, H))

    def forward_loss(p):
        out, cache = rnn.pool_forward(p["h"], mask, lengths, pool)
        dh = rnn.pool_backward(r, cache, T, pool)
        grads = {"h": np.zeros_like(p["h"])}
        grads["h"][1:] = dh
        return float((out * r).sum()), grads
    h = np.random.default_rng(3).standard_normal((T + 1, B, H))
    report = check_layer_grad(forward_loss, {"h": h})
    assert report.ok, report


def test_mean_pool_negative_control_divides_by_the_padded_length():
    mask = _mask()
    r = projection((B, H))

    def forward_loss(p):
        out, _ = rnn.pool_forward(p["h"], mask, LENGTHS.astype(np.float64), "mean")
        grads = {"h": np.zeros_like(p["h"])}
        grads["h"][1:] = mask[:, :, None] * r[None] / T          # wrong: T, not the length
        return float((out * r).sum()), grads
    h = np.random.default_rng(3).standard_normal((T + 1, B, H))
    assert_fails(check_layer_grad(forward_loss, {"h": h}))


# -- the whole model ----------------------------------------------------------------------

SEQS = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([3, 3]), np.array([], dtype=np.int64),
        np.array([7, 0, 2, 5])]
LABELS = np.array([0, 2, 1, 2])


@pytest.mark.parametrize("cell,pool,bptt", [("lstm", "last", 0), ("lstm", "mean", 0),
                                            ("gru", "mean", 0), ("gru", "last", 0)])
def test_classifier_grad(cell, pool, bptt):
    model = rnn.RNNClassifier(vocab_size=8, n_labels=3, embed_dim=3, hidden=4, cell=cell,
                              pool=pool, bptt=bptt)
    tokens, lengths = rnn.pad_left(SEQS, max_len=6)

    def forward_loss(p):
        grads = np.full_like(p["flat"], 7.0)            # stale values must be overwritten
        loss = model.forward_backward(p["flat"], grads, tokens, lengths, LABELS)
        return loss, {"flat": grads}
    flat = 0.5 * np.random.default_rng(4).standard_normal(model.layout.total)
    report = check_layer_grad(forward_loss, {"flat": flat}, max_checks=120)
    assert report.ok, report


def test_pad_left_truncates_keeps_empty_strings_and_right_aligns():
    tokens, lengths = rnn.pad_left(SEQS, max_len=5)
    assert lengths.tolist() == [5, 2, 0, 4] and tokens.shape == (4, 5)
    assert tokens[0].tolist() == [1, 2, 3, 4, 5] and tokens[1].tolist() == [0, 0, 0, 3, 3]
    assert rnn.pad_left([np.array([], np.int64)], 4)[0].shape == (1, 1)


def test_logits_do_not_depend_on_the_rest_of_the_batch():
    model = rnn.RNNClassifier(vocab_size=8, n_labels=3, embed_dim=3, hidden=4, pool="mean")
    flat = np.random.default_rng(5).standard_normal(model.layout.total)
    tokens, lengths = rnn.pad_left(SEQS, max_len=10)
    together = model.logits(flat, tokens, lengths)
    for i, seq in enumerate(SEQS):
        t, n = rnn.pad_left([seq], max_len=10)
        assert np.allclose(model.logits(flat, t, n)[0], together[i], rtol=1e-12, atol=1e-13)


def test_model_rejects_bad_shapes_and_settings():
    with pytest.raises(UserError, match="unknown RNN cell"):
        rnn.RNNClassifier(vocab_size=8, n_labels=3, embed_dim=3, hidden=4, cell="rnn")
    with pytest.raises(UserError, match="n_labels must be a positive integer"):
        rnn.RNNClassifier(vocab_size=8, n_labels=0, embed_dim=3, hidden=4)
    model = rnn.RNNClassifier(vocab_size=8, n_labels=3, embed_dim=3, hidden=4)
    with pytest.raises(UserError, match="tokens \\(B, T\\) and lengths"):
        model.logits(np.zeros(model.layout.total), np.zeros(4, np.int64), np.zeros(4, np.int64))


# -- the workload ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def langid_corpus(tmp_path_factory):
    return make_classification_corpus(tmp_path_factory.mktemp("rnn") / "synthetic.h5")


def _workload(path, *overrides):
    from hpcps.backend import CPU
    from hpcps.workloads import build_workload
    cfg = load_config(None, ["workload=rnn", f"data.path={path}", "rnn.embed_dim=8",
                             "rnn.hidden_size=16", *overrides])
    return cfg, build_workload(cfg, CPU)


def test_workload_metrics_come_from_the_confusion_matrix(langid_corpus):
    cfg, wl = _workload(langid_corpus)
    params = wl.layout.init_slice(cfg.train.seed)
    sums = wl.eval_sums(params, 0, 10_000)               # capped at the 300 val strings
    assert sums["count"] == 300.0
    m = wl.finalize_eval(sums)
    confusion = np.array(m["val_confusion"])
    assert confusion.sum() == 300 and confusion.shape == (4, 4)
    assert m["val_accuracy"] == pytest.approx(np.trace(confusion) / 300)
    assert m["val_majority_accuracy"] == pytest.approx(confusion.sum(axis=1).max() / 300)
    assert 0.0 <= m["val_f1_macro"] <= 1.0 and m["val_loss"] > 0
    # additive: two halves give the same sums as the whole
    a, b = wl.eval_sums(params, 0, 130), wl.eval_sums(params, 130, 300)
    assert all(a[k] + b[k] == pytest.approx(sums[k]) for k in sums)


def test_workload_batches_are_a_pure_function_of_step_and_item(langid_corpus):
    _, wl = _workload(langid_corpus, "rnn.max_len=10")
    tokens, lengths, labels = wl.train_batch(2, 0, 6)
    t2, l2, y2 = wl.train_batch(2, 3, 6)
    assert np.array_equal(labels[3:], y2) and np.array_equal(lengths[3:], l2)
    assert tokens.shape[1] <= 10 and lengths.max() <= 10


def test_workload_needs_a_classification_corpus(shakespeare_corpus, tmp_path):
    with pytest.raises(UserError, match="is a 'lm' corpus, not a sequence corpus"):
        _workload(shakespeare_corpus)
    with pytest.raises(UserError, match="data.path' is empty"):
        _workload("")
    # and the LM workloads refuse a classification corpus by its kind
    path = make_classification_corpus(tmp_path / "c.h5", n_train=20, n_val=5)
    from hpcps.backend import CPU
    from hpcps.workloads import build_workload
    cfg = load_config(None, ["workload=skipgram", f"data.path={path}"])
    with pytest.raises(UserError, match="'classification' corpus"):
        build_workload(cfg, CPU)


def test_short_training_beats_the_majority_baseline(langid_corpus, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "hpcps", "-q", "train", "configs/rnn_langid.toml",
           f"data.path={langid_corpus}", f"out_dir={run}", "rnn.embed_dim=16",
           "rnn.hidden_size=32", "rnn.max_len=24", "train.batch_size=32",
           "train.max_steps=120", "train.eval_every=0", "train.eval_steps=10",
           "train.warmup_steps=10", "train.lr=1e-2", "train.peak_flops=1e9"]
    check_ok(run_command(cmd, 100, mpi_env("mpich")))
    last = read_metrics(run)[-1]
    assert last["step"] == 120
    assert last["val_accuracy"] > last["val_majority_accuracy"] + 0.3, last
    assert last["val_f1_macro"] > 0.5, last
