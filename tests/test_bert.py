"""BERT-style MLM: float64 gradient checks of the new layers (bidirectional attention with
a key padding mask, the MLM head) and of the whole model, each with a negative control;
the 80/10/10 masking as a pure function of (seed, step, sequence); the weighted-mean
contract the parameter server relies on; and a short training run that beats the
unigram baseline."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import NotNumpy, break_gelu_derivative, check_layer_grad, projection

import hpcps.model.bert as bert_model
import hpcps.model.encdec as encdec
from hpcps.backend import CPU, Backend
from hpcps.config.load import load_config
from hpcps.errors import UserError
from hpcps.model import lm_head
from hpcps.model.bert import BertMLM, mlm_head_eval, mlm_head_forward, mlm_head_loss
from hpcps.model.blas import blas_threads_limited
from hpcps.model.workspace import Workspace
from hpcps.workloads.bert import mask_tokens, masked_count

pytestmark = pytest.mark.timeout(120)

TINY = dict(vocab_size=12, n_layer=2, n_head=2, n_embd=8, block_size=6)
rng = np.random.default_rng


# -- bidirectional self-attention with a key padding mask ------------------------------------

def _attention_params(c=8, seed=0):
    r = rng(seed)
    return {"x": r.standard_normal((3, 5, c)), "ln_w": 1 + 0.3 * r.standard_normal(c),
            "ln_b": 0.3 * r.standard_normal(c), "w_qkv": 0.5 * r.standard_normal((3 * c, c)),
            "b_qkv": 0.3 * r.standard_normal(3 * c), "w_proj": 0.5 * r.standard_normal((c, c)),
            "b_proj": 0.3 * r.standard_normal(c)}


def _attention_loss(lengths, causal=False, n_head=2):
    R = projection((3, 5, 8), seed=5)

    def forward_loss(p):
        ws = Workspace(np, reuse=False)
        bias = encdec.key_padding_bias(np, lengths, 5, np.float64)
        out, cache = encdec.self_attention_forward(
            p["x"], p["ln_w"], p["ln_b"], p["w_qkv"], p["b_qkv"], p["w_proj"], p["b_proj"],
            n_head, causal=causal, key_bias=bias, ws=ws, name="a")
        g = {k: np.zeros_like(v) for k, v in p.items()}
        g["x"] = encdec.self_attention_backward(
            R, cache, g["ln_w"], g["ln_b"], g["w_qkv"], g["b_qkv"], g["w_proj"], g["b_proj"],
            ws=ws, name="bwd")
        return float((out * R).sum()), g
    return forward_loss


@pytest.mark.parametrize("lengths,causal", [([5, 2, 3], False), ([1, 4, 5], False),
                                            ([5, 5, 5], False), ([5, 3, 4], True)])
def test_padded_self_attention_grad(lengths, causal):
    report = check_layer_grad(_attention_loss(lengths, causal), _attention_params())
    assert report.ok, report


def test_padded_self_attention_negative_control(monkeypatch):
    # the backward runs on probabilities computed WITHOUT the padding mask
    real = encdec.attention_forward

    def forgetful(q, k, v, **kw):
        out, _ = real(q, k, v, **kw)
        kw_nomask = dict(kw, attn_bias=None, out=None, name="nomask")
        _, cache = real(q, k, v, **kw_nomask)
        return out, cache
    monkeypatch.setattr(encdec, "attention_forward", forgetful)
    monkeypatch.setattr(encdec.attention, "attention_forward", forgetful)  # self-attention's
    report = check_layer_grad(_attention_loss([5, 2, 3]), _attention_params())
    assert not report.ok
    assert report.errors["w_qkv"] > 1e-2


def test_padded_keys_do_not_reach_valid_outputs():
    p = _attention_params()
    ws = Workspace(np, reuse=False)
    lengths = [5, 2, 3]
    args = ("ln_w", "ln_b", "w_qkv", "b_qkv", "w_proj", "b_proj")

    def run(x):
        bias = encdec.key_padding_bias(np, lengths, 5, np.float64)
        return encdec.self_attention_forward(x, *(p[a] for a in args), 2, causal=False,
                                             key_bias=bias, ws=ws, name="a")[0].copy()
    x2 = p["x"].copy()
    x2[1, 2:] += rng(7).standard_normal((3, 8))      # change only padded positions
    x2[2, 3:] -= rng(8).standard_normal((2, 8))
    a, b = run(p["x"]), run(x2)
    np.testing.assert_allclose(a[1, :2], b[1, :2], rtol=1e-12)
    np.testing.assert_allclose(a[2, :3], b[2, :3], rtol=1e-12)
    assert np.abs(a[1, 2:] - b[1, 2:]).max() > 1e-3     # the padded rows themselves do change
    bias = encdec.key_padding_bias(np, [2, 5], 5, np.float32)
    assert bias.shape == (2, 1, 1, 5)
    assert (bias[0, 0, 0] == [0, 0, -np.inf, -np.inf, -np.inf]).all() and (bias[1] == 0).all()


# -- the MLM head ---------------------------------------------------------------------------

def _head_params(v=11, c=8, bias=True, seed=1):
    r = rng(seed)
    p = {"x": r.standard_normal((7, c)), "lnf.w": 1 + 0.3 * r.standard_normal(c),
         "mlm.dense.w": 0.5 * r.standard_normal((c, c)), "mlm.ln.w": 1 + 0.3 * r.standard_normal(c),
         "wte": 0.5 * r.standard_normal((v, c)), "mlm.bias": 0.3 * r.standard_normal(v)}
    if bias:
        p.update({"lnf.b": 0.3 * r.standard_normal(c), "mlm.dense.b": 0.3 * r.standard_normal(c),
                  "mlm.ln.b": 0.3 * r.standard_normal(c)})
    return p


HEAD_TARGETS = np.array([3, 0, 10, 3, 7, 1, 5])


def _head_loss(targets=HEAD_TARGETS):
    def forward_loss(p):
        g = {k: np.full_like(v, np.nan) for k, v in p.items()}   # every gradient must be written
        loss, g["x"] = mlm_head_loss(p["x"], p, targets, Workspace(np, reuse=False), g)
        return loss, g
    return forward_loss


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_rows", [7, 3, 1])     # the decoder in one block, or several
def test_mlm_head_grad(monkeypatch, bias, block_rows):
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", block_rows * 11 * 8)
    report = check_layer_grad(_head_loss(), _head_params(bias=bias))
    assert report.ok, report


def test_mlm_head_negative_control(monkeypatch):
    # a backward that treats GELU as the identity
    monkeypatch.setattr(bert_model, "gelu_backward", lambda dout, cache, ws, name: dout)
    report = check_layer_grad(_head_loss(), _head_params())
    assert not report.ok
    assert report.errors["mlm.dense.w"] > 1e-2 and report.errors["wte"] <= 1e-6


def test_blocked_mlm_head_equals_all_logits_at_once(monkeypatch):
    """Blocks of 2 rows against one block: the loss, every gradient and the argmax count of
    the full logits, to float64 rounding (the weight gradient sums block by block, so the
    bits differ); the workspace holds one (2, V) block and no V x C folded decoder copy."""
    p = _head_params()
    logits = mlm_head_forward(p["x"], p)
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = -log_probs[np.arange(7), HEAD_TARGETS].mean()
    runs = []
    for rows in (7, 2):
        monkeypatch.setattr(lm_head, "CHUNK_BYTES", rows * 11 * 8)
        ws = Workspace(np)
        loss, g = _head_loss()(p)
        runs.append((loss, g, mlm_head_eval(p["x"], p, HEAD_TARGETS, ws)))
    assert runs[0][0] == pytest.approx(expected, rel=1e-13)
    for key, value in runs[0][1].items():
        np.testing.assert_allclose(runs[1][1][key], value, rtol=1e-12, atol=1e-14)
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-13)
    correct = int((logits.argmax(axis=1) == HEAD_TARGETS).sum())
    assert runs[0][2][1] == runs[1][2][1] == correct
    assert runs[1][2][0] == pytest.approx(expected, rel=1e-13)
    assert ws._buffers["head.logits"].shape == (2, 11)
    assert max(b.size for b in ws._buffers.values()) < 7 * 11


@pytest.mark.parametrize("mode", ["attention", "block"])
def test_blocked_head_gradients_bit_identical_across_recompute_modes(monkeypatch, mode):
    """With the decoder in blocks of 3 rows, recomputation still changes no bit."""
    def grads(recompute):
        model = BertMLM(**TINY, bias=True, dropout=0.2, recompute=recompute)
        params = model.init_params(6)
        out = np.empty_like(params)
        idx, targets = _batch(b=4, t=6, seed=3)
        targets[3, :3] = [2, 9, 4]
        loss = model.forward_backward(params, out, idx, targets, [1, 2, 3, 4])
        return loss, out
    monkeypatch.setattr(lm_head, "CHUNK_BYTES", 3 * 12 * 4)
    loss_none, g_none = grads("none")
    loss, g = grads(mode)
    assert loss == loss_none and np.array_equal(g, g_none)


# -- whole model ----------------------------------------------------------------------------

def _batch(b=3, t=5, seed=0, vocab=12):
    r = rng(seed)
    idx = r.integers(0, vocab, (b, t))
    targets = np.full((b, t), -1)
    targets[0, 1], targets[1, 0], targets[2, t - 1], targets[2, 2] = 3, 5, 7, 1
    return idx, targets


def _model_report(model, keys=None):
    flat = model.init_params(3).astype(np.float64)
    flat += rng(9).standard_normal(flat.size) * 0.2
    grads, scratch = np.empty_like(flat), np.empty_like(flat)
    idx, targets = _batch()
    model.forward_backward(flat, grads, idx, targets, keys)
    analytic = model.layout.views(grads)
    return check_layer_grad(lambda _: (model.forward_backward(flat, scratch, idx, targets, keys),
                                       analytic), model.layout.views(flat), max_checks=10)


@pytest.mark.parametrize("bias,dropout", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_model_gradient_float64(bias, dropout):
    keys = [4, 17, 99] if dropout else None
    report = _model_report(BertMLM(**TINY, bias=bias, dropout=dropout), keys)
    assert report.ok, report


def test_model_gradient_negative_control(monkeypatch):
    break_gelu_derivative(monkeypatch)
    report = _model_report(BertMLM(**TINY))
    assert not report.ok
    assert report.errors["h0.mlp.fc.w"] > 100 * report.rtol


def test_grads_overwritten_and_ranges_reported_in_order():
    model = BertMLM(**TINY, bias=True)
    params = model.init_params(1)
    idx, targets = _batch(t=4)           # t < block_size: unused position rows get 0
    clean, dirty = np.zeros_like(params), np.full_like(params, np.nan)
    seen = []
    model.forward_backward(params, clean, idx, targets)
    model.forward_backward(params, dirty, idx, targets,
                           on_grad_ready=lambda lo, hi: seen.append((lo, hi, dirty[lo:hi].copy())))
    np.testing.assert_array_equal(dirty, clean)
    lay = model.layout
    assert [s[:2] for s in seen] == [(lay["lnf.w"].offset, lay.total),
                                     (lay["h1.ln1.w"].offset, lay["h1.mlp.proj.b"].end),
                                     (lay["h0.ln1.w"].offset, lay["h0.mlp.proj.b"].end),
                                     (0, lay["wpe"].end)]
    for lo, hi, snapshot in seen:           # final when reported
        np.testing.assert_array_equal(snapshot, dirty[lo:hi])
    assert not lay.views(clean)["wpe"][4:].any() and lay.views(clean)["wpe"][:4].all()


def test_gpu_code_path_matches_cpu_path():
    idx, targets = _batch()
    results = []
    for backend in (CPU, Backend("stand-in", NotNumpy("stand_in"))):
        model = BertMLM(**TINY, bias=True, dropout=0.2, backend=backend)
        params = model.init_params(4)
        grads = np.empty_like(params)
        results.append((model.forward_backward(params, grads, idx, targets, [5, 6, 7]), grads,
                        model.eval_stats(params, idx, targets)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert results[0][2][1:] == results[1][2][1:]


def test_eval_stats_match_training_loss():
    model = BertMLM(**TINY)
    params = model.init_params(2)
    idx, targets = _batch()
    loss = model.forward_backward(params, np.empty_like(params), idx, targets)
    nll, correct, n = model.eval_stats(params, idx, targets)
    assert n == 4 and nll / n == pytest.approx(loss, rel=1e-6)
    logits = model.logits(params, idx, targets)
    assert correct == int((logits.argmax(1) == targets[targets != -1]).sum())


def test_bad_inputs():
    model = BertMLM(**TINY)
    params = model.init_params(0)
    idx, targets = _batch()
    with pytest.raises(UserError, match="select no position"):
        model.forward_backward(params, np.empty_like(params), idx, np.full_like(targets, -1))
    with pytest.raises(UserError, match="token ids must be in 0..11"):
        model.forward_backward(params, np.empty_like(params), idx + 12, targets)
    with pytest.raises(UserError, match="block_size"):
        model.forward_backward(params, np.empty_like(params), np.zeros((2, 7), int),
                               np.zeros((2, 7), int))
    with pytest.raises(UserError, match="divisible"):
        BertMLM(vocab_size=5, n_layer=1, n_head=3, n_embd=8, block_size=4)


# -- masking --------------------------------------------------------------------------------

def test_masking_follows_the_80_10_10_rule():
    tokens = rng(0).integers(0, 50, (4000, 40))
    keys = np.arange(4000, dtype=np.uint64) * 7919 + 1
    inputs, targets = mask_tokens(tokens, keys, vocab_size=50, mask_id=50)
    picked = targets != -1
    assert (picked.sum(1) == 6).all()                       # round(0.15 x 40) in every row
    np.testing.assert_array_equal(targets[picked], tokens[picked])
    np.testing.assert_array_equal(inputs[~picked], tokens[~picked])
    n = picked.sum()
    masked = (inputs == 50).sum() / n
    changed = ((inputs != tokens) & (inputs != 50)).sum() / n
    same = (picked & (inputs == tokens)).sum() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    assert changed == pytest.approx(0.1 * 49 / 50, abs=0.01)   # a random token may be the same
    assert same == pytest.approx(0.1 + 0.1 / 50, abs=0.01)
    assert inputs.max() <= 50 and (inputs[picked & (inputs != 50)] < 50).all()
    # positions are spread evenly
    per_col = picked.mean(0)
    assert per_col.min() > 0.12 and per_col.max() < 0.18


def test_masking_depends_only_on_each_key():
    tokens = rng(1).integers(0, 20, (6, 16))
    keys = np.array([5, 9, 1 << 40, 3, 77, 12], dtype=np.uint64)
    whole = mask_tokens(tokens, keys, vocab_size=20, mask_id=20)
    parts = [mask_tokens(tokens[a:b], keys[a:b], vocab_size=20, mask_id=20)
             for a, b in ((0, 1), (1, 4), (4, 6))]
    for k in range(2):
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    other = mask_tokens(tokens, keys + np.uint64(1), vocab_size=20, mask_id=20)
    assert (other[1] != whole[1]).any()
    assert masked_count(16, 0.15) == 2 and masked_count(3, 0.15) == 1 and masked_count(4, 1) == 4


def _bert_cfg(corpus, *extra):
    return load_config(None, ["workload=bert", f"data.path={corpus}", "model.n_layer=2",
                              "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                              "model.bias=true", "train.batch_size=16", "train.eval_steps=4",
                              *extra])


def test_workload_batches_are_independent_of_the_split(shakespeare_corpus):
    from hpcps.workloads.bert import build
    w = build(_bert_cfg(shakespeare_corpus, "model.dropout=0.1"), CPU)
    whole = w.train_batch(7, 0, 6)
    for k in range(2):
        np.testing.assert_array_equal(whole[k], np.concatenate([w.train_batch(7, 0, 2)[k],
                                                                w.train_batch(7, 2, 6)[k]]))
    assert (w.train_batch(8, 0, 6)[0] != whole[0]).any()
    # the PS's weighted mean of the two workers' results is the one-process result
    params = w.model.init_params(1).astype(np.float64)
    g_all, g_a, g_b = (np.empty_like(params) for _ in range(3))
    l_all, n_all = w.loss_and_grad(params, g_all, whole, 7, 0)
    l_a, n_a = w.loss_and_grad(params, g_a, w.train_batch(7, 0, 2), 7, 0)
    l_b, n_b = w.loss_and_grad(params, g_b, w.train_batch(7, 2, 6), 7, 2)
    assert (n_all, n_a, n_b) == (6 * 5, 2 * 5, 4 * 5)
    assert l_all == pytest.approx((n_a * l_a + n_b * l_b) / n_all, rel=1e-10)
    np.testing.assert_allclose(g_all, (n_a * g_a + n_b * g_b) / n_all, rtol=1e-8, atol=1e-14)
    # negative control: an unweighted mean differs once the counts differ
    assert not np.allclose(g_all, (g_a + g_b) / 2, rtol=1e-6)


def test_the_run_log_holds_the_masked_token_loss(shakespeare_corpus, tmp_path):
    """Step 1's logged train loss is the mean cross-entropy per masked (predicted) token of
    step 0's sequences under the initial parameters."""
    from train_util import logged_losses, token_cross_entropy

    from hpcps.workloads.bert import build
    cfg = _bert_cfg(shakespeare_corpus, "train.max_steps=1", "train.eval_every=0",
                    "train.eval_steps=1", "train.peak_flops=1e12")
    logged = logged_losses(cfg, tmp_path / "run")
    w = build(cfg, CPU)
    params = w.layout.init_slice(cfg.train.seed)
    inputs, targets = w.train_batch(0, 0, cfg.train.batch_size)
    predicted = targets[targets != -1]
    assert 0 < len(predicted) < targets.size                     # a share of the positions
    expected = token_cross_entropy(w.model.logits(params, inputs, targets), predicted)
    assert logged == [pytest.approx(expected, rel=1e-5)]


def test_workload_config_errors(shakespeare_corpus, make_corpus):
    from hpcps.workloads.bert import build
    with pytest.raises(UserError, match="exceed 1"):
        build(_bert_cfg(shakespeare_corpus, "bert.mask_token_prob=0.95"), CPU)
    with pytest.raises(UserError, match="data.path"):
        build(load_config(None, ["workload=bert"]), CPU)
    tiny = make_corpus("abcdefghij" * 4)
    with pytest.raises(UserError, match="fewer than block_size"):
        build(_bert_cfg(tiny), CPU)


@pytest.mark.timeout(90)
def test_short_training_beats_the_unigram_baseline(shakespeare_corpus, real_shakespeare):
    from hpcps.optim import AdamW
    from hpcps.workloads.bert import build
    w = build(_bert_cfg(shakespeare_corpus, "model.n_layer=1", "model.n_head=4",
                        "model.n_embd=64", "train.batch_size=32"), CPU)
    params = w.model.init_params(1)
    grads = np.empty_like(params)
    opt = AdamW(params.size, w.layout.decay_ranges(), beta2=0.99, weight_decay=0.01)
    before = w.finalize_eval(w.eval_sums(params, 0, 128))
    with blas_threads_limited(1):   # small GEMMs: threads only spin on a busy machine
        for step in range(600):
            w.loss_and_grad(params, grads, w.train_batch(step, 0, 32), step, 0)
            opt.step(params, grads, 3e-3 * min(1.0, (step + 1) / 50))
    after = w.finalize_eval(w.eval_sums(params, 0, 128))
    # the baseline: always the most frequent training character (the space)
    assert after["val_unigram_accuracy"] == before["val_unigram_accuracy"] > 0.05
    assert before["val_accuracy"] < before["val_unigram_accuracy"] + 0.05
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert after["val_accuracy"] > after["val_unigram_accuracy"] + 0.1, after
