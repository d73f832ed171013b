"""T5-style seq2seq: float64 gradient checks of cross-attention with a key padding mask and
of the whole model (each with a negative control), padding invariance, the gradient
ranges the parameter server pushes, greedy and beam decoding (against teacher forcing
and an exhaustive search), batch layout, additive BLEU statistics, the weighted-mean
contract, and a short training run that beats the copy-source BLEU baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gradcheck import NotNumpy, break_gelu_derivative, check_layer_grad, projection
from synthetic_corpora import HANZI, LETTERS, mapping_pairs, write_mapping_corpus

import hpcps.model.encdec as encdec
from hpcps.backend import CPU, Backend
from hpcps.config.load import load_config
from hpcps.errors import UserError
from hpcps.model.blas import blas_threads_limited
from hpcps.model.seq2seq import Seq2Seq, length_penalty
from hpcps.model.workspace import Workspace
from hpcps.workloads.seq2seq import SideVocab, bleu_from_sums, bleu_sums, pad_batch

pytestmark = pytest.mark.timeout(120)
rng = np.random.default_rng


@pytest.fixture(scope="module")
def mapping_corpus(tmp_path_factory):
    pytest.importorskip("hpcps.data.seqcorpus")
    return write_mapping_corpus(tmp_path_factory.mktemp("par") / "map.h5")


def s2s_cfg(corpus, *extra):
    return load_config(None, ["workload=seq2seq", f"data.path={corpus}", "model.n_layer=1",
                              "model.n_head=2", "model.n_embd=32", "model.bias=true",
                              "seq2seq.max_src_len=10", "seq2seq.max_tgt_len=10",
                              "train.batch_size=16", "seq2seq.eval_pairs=64", *extra])


# -- cross-attention with a key padding mask -------------------------------------------------

def _cross_params(c=8, seed=0):
    r = rng(seed)
    return {"x": r.standard_normal((3, 4, c)), "enc": r.standard_normal((3, 5, c)),
            "ln_w": 1 + 0.3 * r.standard_normal(c), "ln_b": 0.3 * r.standard_normal(c),
            "w_q": 0.5 * r.standard_normal((c, c)), "b_q": 0.3 * r.standard_normal(c),
            "w_kv": 0.5 * r.standard_normal((2 * c, c)), "b_kv": 0.3 * r.standard_normal(2 * c),
            "w_proj": 0.5 * r.standard_normal((c, c)), "b_proj": 0.3 * r.standard_normal(c)}


NAMES = ("ln_w", "ln_b", "w_q", "b_q", "w_kv", "b_kv", "w_proj", "b_proj")


def _cross_loss(lengths):
    R = projection((3, 4, 8), seed=5)

    def forward_loss(p):
        ws = Workspace(np, reuse=False)
        bias = encdec.key_padding_bias(np, lengths, 5, np.float64)
        out, cache = encdec.cross_attention_forward(p["x"], p["enc"], *(p[n] for n in NAMES), 2,
                                                    key_bias=bias, ws=ws, name="c")
        g = {k: np.zeros_like(v) for k, v in p.items()}
        g["x"], g["enc"] = encdec.cross_attention_backward(R, cache, *(g[n] for n in NAMES),
                                                           ws=ws, name="bwd")
        return float((out * R).sum()), g
    return forward_loss


@pytest.mark.parametrize("lengths", [[5, 2, 3], [1, 5, 4], [5, 5, 5]])
def test_cross_attention_grad(lengths):
    report = check_layer_grad(_cross_loss(lengths), _cross_params())
    assert report.ok, report


def test_cross_attention_negative_control(monkeypatch):
    # the backward runs on probabilities computed WITHOUT the key padding mask
    real = encdec.attention_forward

    def forgetful(q, k, v, **kw):
        out, _ = real(q, k, v, **kw)
        _, cache = real(q, k, v, **dict(kw, attn_bias=None, out=None, name="nomask"))
        return out, cache
    monkeypatch.setattr(encdec, "attention_forward", forgetful)
    report = check_layer_grad(_cross_loss([5, 2, 3]), _cross_params())
    assert not report.ok
    assert report.errors["enc"] > 1e-2 and report.errors["w_kv"] > 1e-2


def test_padded_encoder_rows_are_invisible():
    p = _cross_params()
    lengths = [5, 2, 3]
    loss = _cross_loss(lengths)
    base, grads = loss(p)
    assert not grads["enc"][1, 2:].any() and not grads["enc"][2, 3:].any()   # exactly zero
    assert np.abs(grads["enc"][1, :2]).min() > 0
    p["enc"][1, 2:] = rng(3).standard_normal((3, 8)) * 5
    assert loss(p)[0] == pytest.approx(base, rel=1e-12)


# -- whole model ----------------------------------------------------------------------------

TINY = dict(src_vocab=10, tgt_vocab=9, n_layer=2, n_dec_layer=1, n_head=2, n_embd=8,
            max_src_len=7, max_tgt_len=6)


def _batch(seed=0):
    r = rng(seed)
    src = r.integers(0, 10, (3, 5))
    src_len = np.array([5, 2, 3])
    tgt_in = r.integers(0, 9, (3, 4))
    tgt_out = r.integers(0, 9, (3, 4))
    tgt_out[1, 3], tgt_out[2, 2:] = -1, -1
    return src, src_len, tgt_in, tgt_out


def _model_report(model, keys=None):
    flat = model.init_params(3).astype(np.float64)
    flat += rng(9).standard_normal(flat.size) * 0.3   # larger than init: no vanishing gradients
    grads, scratch = np.empty_like(flat), np.empty_like(flat)
    batch = _batch()
    model.forward_backward(flat, grads, *batch, keys)
    analytic = model.layout.views(grads)
    return check_layer_grad(lambda _: (model.forward_backward(flat, scratch, *batch, keys),
                                       analytic), model.layout.views(flat), max_checks=8)


SHARED = dict(TINY, tgt_vocab=10)       # one vocabulary for both sides


@pytest.mark.parametrize("shape,options", [
    (TINY, dict(bias=False, dropout=0.0, tie_embeddings=True)),
    (TINY, dict(bias=True, dropout=0.0, tie_embeddings=False)),
    (TINY, dict(bias=True, dropout=0.3, tie_embeddings=True)),
    (TINY, dict(bias=True, label_smoothing=0.1)),
    (SHARED, dict(bias=True, share_embeddings=True)),
    (SHARED, dict(share_embeddings=True, tie_embeddings=False, label_smoothing=0.2)),
    (SHARED, dict(share_embeddings=True, dropout=0.3)),
])
def test_model_gradient_float64(shape, options):
    model = Seq2Seq(**shape, **options)
    report = _model_report(model, [4, 17, 99] if options.get("dropout") else None)
    assert report.ok, report


def test_label_smoothing_is_the_smoothed_cross_entropy():
    src, src_len, tgt_in, tgt_out = _batch()
    plain, smooth = (Seq2Seq(**TINY, bias=True, label_smoothing=eps) for eps in (0.0, 0.1))
    params = plain.init_params(5).astype(np.float64)
    params += rng(2).standard_normal(params.size) * 0.3
    logits = plain.logits(params, src, src_len, tgt_in).reshape(-1, TINY["tgt_vocab"])
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    t = tgt_out.reshape(-1)
    rows = np.flatnonzero(t != -1)
    nll, uniform = -logp[rows, t[rows]], -logp[rows].mean(axis=1)
    g0, g1, g2 = (np.empty_like(params) for _ in range(3))
    loss0 = plain.forward_backward(params, g0, src, src_len, tgt_in, tgt_out)
    loss1 = smooth.forward_backward(params, g1, src, src_len, tgt_in, tgt_out)
    assert loss0 == pytest.approx(nll.mean(), rel=1e-12)
    assert loss1 == pytest.approx((0.9 * nll + 0.1 * uniform).mean(), rel=1e-12)
    assert not np.allclose(g0, g1)                                   # it changes the gradient
    # loss_scale multiplies the gradient, never the loss
    assert smooth.forward_backward(params, g2, src, src_len, tgt_in, tgt_out,
                                   loss_scale=2.5) == loss1
    np.testing.assert_allclose(g2, 2.5 * g1, rtol=1e-12, atol=1e-15)
    with pytest.raises(UserError, match="label smoothing must be in"):
        Seq2Seq(**TINY, label_smoothing=1.0)


def test_shared_embeddings_need_one_vocabulary():
    with pytest.raises(UserError, match="the source has 10 ids and the target 9"):
        Seq2Seq(**TINY, share_embeddings=True)
    model = Seq2Seq(**SHARED, share_embeddings=True)
    names = [spec.name for spec in model.layout.specs]
    assert names[:2] == ["wte", "enc.wpe"] and "enc.wte" not in names and "dec.wte" not in names
    unshared = Seq2Seq(**SHARED)
    assert unshared.layout.total - model.layout.total == 10 * TINY["n_embd"]


def test_model_gradient_negative_control(monkeypatch):
    break_gelu_derivative(monkeypatch)
    report = _model_report(Seq2Seq(**TINY))
    assert not report.ok
    assert report.errors["dec.h0.mlp.fc.w"] > 100 * report.rtol


@pytest.mark.parametrize("tie,share", [(True, False), (False, False), (True, True),
                                       (False, True)])
def test_grads_overwritten_and_ranges_cover_the_buffer(tie, share):
    model = Seq2Seq(**(SHARED if share else TINY), bias=True, tie_embeddings=tie,
                    share_embeddings=share)
    params = model.init_params(1)
    batch = _batch()
    clean, dirty = np.zeros_like(params), np.full_like(params, np.nan)
    model.forward_backward(params, clean, *batch)
    seen = []
    model.forward_backward(params, dirty, *batch,
                           on_grad_ready=lambda lo, hi: seen.append((lo, hi, dirty[lo:hi].copy())))
    np.testing.assert_array_equal(dirty, clean)
    spans = sorted(s[:2] for s in seen)
    assert spans[0][0] == 0 and spans[-1][1] == model.layout.total
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))        # no gap, no overlap
    lay = model.layout
    assert seen[0][:2] == (lay["dec.lnf.w"].offset, lay.total)        # the head first
    assert seen[-1][:2] == (0, lay["enc.wpe"].end)                    # the encoder input last
    for lo, hi, snapshot in seen:
        np.testing.assert_array_equal(snapshot, dirty[lo:hi])         # final when reported
    views = lay.views(clean)
    assert not views["enc.wpe"][5:].any() and not views["dec.wpe"][4:].any()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_padding_does_not_change_loss_or_gradients(dropout):
    # dropout masks are keyed per pair and drawn at full size: padding must not move them
    model = Seq2Seq(**TINY, bias=True, dropout=dropout)
    keys = [11, 12, 13] if dropout else None
    params = model.init_params(2).astype(np.float64)
    src, src_len, tgt_in, tgt_out = _batch()
    g1, g2 = np.empty_like(params), np.empty_like(params)
    loss = model.forward_backward(params, g1, src, src_len, tgt_in, tgt_out, keys)
    wider_src = np.concatenate([src, rng(4).integers(0, 10, (3, 2))], axis=1)   # junk padding
    wider_src[1, 2:] = 3
    wider_in = np.concatenate([tgt_in, np.full((3, 2), 8)], axis=1)
    wider_out = np.concatenate([tgt_out, np.full((3, 2), -1)], axis=1)
    loss2 = model.forward_backward(params, g2, wider_src, src_len, wider_in, wider_out, keys)
    assert loss2 == pytest.approx(loss, rel=1e-12)
    lay = model.layout
    for name in ("enc.h0.attn.qkv.w", "dec.h0.cross.kv.w", "dec.wte", "enc.lnf.w"):
        np.testing.assert_allclose(lay.views(g2)[name], lay.views(g1)[name], rtol=1e-9,
                                   atol=1e-15)
    # position rows used only by padding get no gradient either
    np.testing.assert_allclose(g2[lay["enc.wpe"].offset:lay["enc.wpe"].end],
                               g1[lay["enc.wpe"].offset:lay["enc.wpe"].end], atol=1e-15)
    # negative control: a longer src_len lets the padding in
    longer = model.forward_backward(params, g2, wider_src, src_len + 1, wider_in, wider_out, keys)
    assert abs(longer - loss) > 1e-6


def test_bad_batches():
    model = Seq2Seq(**TINY)
    params = model.init_params(0)
    src, src_len, tgt_in, tgt_out = _batch()
    grads = np.empty_like(params)
    with pytest.raises(UserError, match="src_len must be in 1..5"):
        model.forward_backward(params, grads, src, src_len * 0, tgt_in, tgt_out)
    with pytest.raises(UserError, match="exceed max_src_len"):
        model.forward_backward(params, grads, np.zeros((3, 8), int), src_len, tgt_in, tgt_out)
    with pytest.raises(UserError, match="tgt_out ids must be in -1..8"):
        model.forward_backward(params, grads, src, src_len, tgt_in, tgt_out + 9)
    with pytest.raises(UserError, match="disagree"):
        model.forward_backward(params, grads, src, src_len, tgt_in[:2], tgt_out[:2])


# -- decoding -------------------------------------------------------------------------------

def _decoder_model(tgt_vocab=9, max_tgt_len=8, seed=3):
    model = Seq2Seq(src_vocab=10, tgt_vocab=tgt_vocab, n_layer=2, n_dec_layer=2, n_head=2,
                    n_embd=16, max_src_len=7, max_tgt_len=max_tgt_len, bias=True)
    params = model.init_params(seed)
    params += rng(9).standard_normal(params.size).astype(np.float32) * 0.5
    src = rng(0).integers(0, 10, (4, 6))
    return model, params, src, np.array([6, 2, 3, 1])


def _score(model, params, src, src_len, hyp, bos, eos, alpha):
    """Length-normalised log-probability of hyp (+ EOS unless it fills max_tgt_len)."""
    toks = list(hyp) + ([eos] if len(hyp) < model.max_tgt_len else [])
    logits = model.logits(params, src[None], src_len[None], np.array([[bos] + toks[:-1]]))[0]
    logits = logits.astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return sum(logp[i, t] for i, t in enumerate(toks)) / length_penalty(len(toks), alpha)


def test_greedy_decoding_matches_teacher_forcing():
    model, params, src, src_len = _decoder_model()
    hyps = model.greedy(params, src, src_len, bos=7, eos=8, banned=(7,))
    assert model.beam_search(params, src, src_len, 7, 8, beam=1, banned=(7,)) == hyps
    for b, hyp in enumerate(hyps):
        assert 7 not in hyp and 8 not in hyp
        toks = hyp + ([8] if len(hyp) < 8 else [])
        logits = model.logits(params, src[b:b + 1], src_len[b:b + 1],
                              np.array([[7] + toks[:-1]]))[0]
        logits[:, 7] = -np.inf
        assert logits.argmax(1).tolist() == toks     # the cached step == the full forward


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_best_hypothesis(alpha):
    # target vocabulary {0, 1} + PAD 2, BOS 3, EOS 4; 3 positions: 15 hypotheses in all
    model, params, src, src_len = _decoder_model(tgt_vocab=5, max_tgt_len=3, seed=5)
    found = model.beam_search(params, src, src_len, bos=3, eos=4, beam=8, alpha=alpha,
                              banned=(2, 3))
    for b in range(len(src)):
        every = [list(h) for n in range(4) for h in itertools.product((0, 1), repeat=n)]
        scores = [_score(model, params, src[b], src_len[b], h, 3, 4, alpha) for h in every]
        assert found[b] == every[int(np.argmax(scores))], (b, alpha)
    narrow = model.beam_search(params, src, src_len, 3, 4, beam=2, alpha=alpha, banned=(2, 3))
    for b in range(len(src)):
        best = _score(model, params, src[b], src_len[b], found[b], 3, 4, alpha)
        assert _score(model, params, src[b], src_len[b], narrow[b], 3, 4, alpha) <= best + 1e-6


@pytest.mark.parametrize("beam,eos_scale", [(1, 2.8), (3, 3.5)])
def test_finished_sources_leave_the_batch(beam, eos_scale, monkeypatch):
    model, params, _, _ = _decoder_model()
    model.layout.views(params)["dec.wte"][8] *= eos_scale   # make EOS likely for some sources
    src = rng(1).integers(0, 10, (8, 6))
    src_len = np.array([6, 2, 3, 1, 5, 4, 6, 2])
    alone = [model.beam_search(params, src[i:i + 1], src_len[i:i + 1], 7, 8, beam=beam,
                               banned=(7,))[0] for i in range(8)]
    rows = []
    real = model._step_logprobs
    monkeypatch.setattr(model, "_step_logprobs",
                        lambda P, state, tokens, pos, bias: rows.append(len(tokens)) or
                        real(P, state, tokens, pos, bias))
    together = model.beam_search(params, src, src_len, 7, 8, beam=beam, banned=(7,))
    assert together == alone                      # batching and pruning change nothing
    assert rows[0] == 8 * beam and 0 < rows[-1] < rows[0]
    assert len({len(h) for h in together}) == 2   # some stopped early, some ran to the end


def test_beam_beats_or_ties_greedy():
    model, params, src, src_len = _decoder_model()
    greedy = model.greedy(params, src, src_len, 7, 8, banned=(7,))
    beam = model.beam_search(params, src, src_len, 7, 8, beam=4, alpha=0.0, banned=(7,))
    gaps = [_score(model, params, src[b], src_len[b], beam[b], 7, 8, 0.0)
            - _score(model, params, src[b], src_len[b], greedy[b], 7, 8, 0.0) for b in range(4)]
    assert min(gaps) >= -1e-5 and max(gaps) > 0.01    # never worse, and better somewhere


def test_gpu_code_path_matches_cpu_path():
    batch = _batch()
    results = []
    for backend in (CPU, Backend("stand-in", NotNumpy("stand_in"))):
        model = Seq2Seq(**TINY, bias=True, tie_embeddings=False, dropout=0.2, backend=backend)
        params = model.init_params(4)
        grads = np.empty_like(params)
        loss = model.forward_backward(params, grads, *batch, [1, 2, 3])
        hyps = model.beam_search(params, batch[0], batch[1], 7, 8, beam=3, banned=(7,))
        results.append((loss, grads, hyps))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
    assert results[0][2] == results[1][2]


# -- workload pieces ------------------------------------------------------------------------

def test_pad_batch_layout():
    from hpcps.data.tokenizer import CharTokenizer
    src, tgt = SideVocab(CharTokenizer("abc")), SideVocab(CharTokenizer("xyz"))
    assert (src.pad, src.bos, src.eos, src.size) == (3, 4, 5, 6)
    s, s_len, t_in, t_out = pad_batch([[0, 1, 2, 0, 1], [2]], [[1], [0, 1, 2, 2]], src, tgt,
                                      max_src=4, max_tgt=4)
    assert s.tolist() == [[0, 1, 2, 5], [2, 5, 3, 3]] and s_len.tolist() == [4, 2]
    assert t_in.tolist() == [[4, 1, 3, 3], [4, 0, 1, 2]]
    assert t_out.tolist() == [[1, 5, -1, -1], [0, 1, 2, 5]]
    assert tgt.decode([1, 5, 3, 0]) == "yx"


def test_bleu_statistics_add_up():
    from hpcps.metrics.text import bleu
    hyps = ["我 爱 你", "今天 天气 很好", "打开 文件", "保存"]
    refs = ["我爱你们", "今天天气很好", "打开这个文件", "保存文件"]
    halves = [bleu_sums(hyps[:1], refs[:1], "b"), bleu_sums(hyps[1:], refs[1:], "b")]
    total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    expected = bleu(hyps, refs, tokenize="zh")["score"]
    assert bleu_from_sums(total, "b") == pytest.approx(expected, rel=1e-12)
    assert 0 < expected < 100
    # negative control: averaging the halves' scores is not corpus BLEU
    mean = (bleu_from_sums(halves[0], "b") + bleu_from_sums(halves[1], "b")) / 2
    assert abs(mean - expected) > 1.0


def test_workload_split_is_a_weighted_mean(mapping_corpus):
    from hpcps.workloads.seq2seq import build
    w = build(s2s_cfg(mapping_corpus, "model.dropout=0.2"), CPU)
    params = w.model.init_params(1).astype(np.float64)
    # a step where the two slices are padded to different widths (source and target)
    step = next(t for t in range(100)
                if all(len({w.train_batch(t, 0, 3)[k].shape[1], w.train_batch(t, 3, 7)[k].shape[1]})
                       == 2 for k in (0, 2)))
    whole, a, b = w.train_batch(step, 0, 7), w.train_batch(step, 0, 3), w.train_batch(step, 3, 7)
    g_all, g_a, g_b = (np.empty_like(params) for _ in range(3))
    l_all, n_all = w.loss_and_grad(params, g_all, whole, step, 0)
    l_a, n_a = w.loss_and_grad(params, g_a, a, step, 0)
    l_b, n_b = w.loss_and_grad(params, g_b, b, step, 3)
    assert n_all == n_a + n_b == float((whole[3] != -1).sum()) and n_a != n_b
    assert l_all == pytest.approx((n_a * l_a + n_b * l_b) / n_all, rel=1e-10)
    np.testing.assert_allclose(g_all, (n_a * g_a + n_b * g_b) / n_all, rtol=1e-8, atol=1e-13)
    assert not np.allclose(g_all, (g_a + g_b) / 2, rtol=1e-6)         # weights matter
    rows = w.touched_rows(whole)
    assert set(rows) == {"enc.wte"} and rows["enc.wte"].tolist() == np.unique(whole[0]).tolist()


def test_length_buckets_draw_each_step_from_one_bucket(mapping_corpus):
    from hpcps.workloads.seq2seq import build
    plain = build(s2s_cfg(mapping_corpus), CPU)
    w = build(s2s_cfg(mapping_corpus, "seq2seq.length_buckets=8"), CPU)
    order, bounds = w.length_buckets()
    assert sorted(order.tolist()) == list(range(w.n_train)) and bounds.tolist()[-1] == w.n_train
    bucket_of = np.empty(w.n_train, dtype=np.int64)
    for b in range(8):
        bucket_of[order[bounds[b]:bounds[b + 1]]] = b
    steps = 3000
    seen = np.zeros(8)
    for step in range(steps):
        idx = w.train_indices(step, 0, 16)
        assert len(set(bucket_of[idx])) == 1                         # one bucket per step
        np.testing.assert_array_equal(idx, np.concatenate([w.train_indices(step, 0, 5),
                                                           w.train_indices(step, 5, 16)]))
        seen[bucket_of[idx[0]]] += 1
    # a bucket is drawn as often as it has pairs, so every pair stays equally likely
    np.testing.assert_allclose(seen / steps, np.diff(bounds) / w.n_train, atol=0.025)
    padding = [sum(int((m.train_batch(t, 0, 16)[0] == m.src.pad).sum()) for t in range(200))
               for m in (plain, w)]
    assert padding[1] < 0.25 * padding[0]                            # far less padding
    assert plain.train_indices(0, 0, 16).tolist() != w.train_indices(0, 0, 16).tolist()


def test_bucketed_steps_weigh_tokens_equally_and_report_the_per_token_loss(mapping_corpus):
    """With buckets a step's gradient is its per-token gradient scaled by its bucket's mean
    target length over the split's; the loss reported (and logged) stays the plain mean
    cross-entropy per target token, and workers still add up to one process exactly."""
    from hpcps.workloads.seq2seq import build
    w = build(s2s_cfg(mapping_corpus, "seq2seq.length_buckets=8"), CPU)
    plain = build(s2s_cfg(mapping_corpus), CPU)
    order, bounds = w.length_buckets()
    targets = np.minimum(w.corpus.split("train").lengths("tgt"), w.max_tgt - 1) + 1
    scales = w.bucket_gradient_scales()
    for b in range(8):
        bucket = targets[order[bounds[b]:bounds[b + 1]]]
        assert scales[b] == pytest.approx(bucket.mean() / targets.mean(), rel=1e-12)
    assert scales[0] < 1.0 < scales[-1]                             # long buckets weigh more
    params = w.model.init_params(1).astype(np.float64)
    g_all, g_a, g_b, g_plain = (np.empty_like(params) for _ in range(4))
    for step in (3, 4):
        scale = scales[w.bucket_of_step(step)]
        assert abs(scale - 1.0) > 0.05                              # the scale is checked
        whole, a = w.train_batch(step, 0, 7), w.train_batch(step, 0, 3)
        b = w.train_batch(step, 3, 7)
        tokens = float((whole[3] != -1).sum())
        l_all, n_all = w.loss_and_grad(params, g_all, whole, step, 0)
        l_plain, _ = plain.loss_and_grad(params, g_plain, whole, step, 0)
        assert n_all == tokens and l_all == pytest.approx(l_plain, rel=1e-12)
        np.testing.assert_allclose(g_all, scale * g_plain, rtol=1e-10, atol=1e-15)
        l_a, n_a = w.loss_and_grad(params, g_a, a, step, 0)
        l_b, n_b = w.loss_and_grad(params, g_b, b, step, 3)
        assert l_all == pytest.approx((n_a * l_a + n_b * l_b) / (n_a + n_b), rel=1e-10)
        np.testing.assert_allclose(g_all, (n_a * g_a + n_b * g_b) / (n_a + n_b), rtol=1e-8,
                                   atol=1e-13)


def test_the_run_log_holds_the_per_token_loss_with_length_buckets(mapping_corpus, tmp_path):
    """Step 1's logged train loss is the mean cross-entropy per target token of step 0's
    pairs under the initial parameters: the bucket's gradient scale does not show."""
    from train_util import logged_losses, token_cross_entropy

    from hpcps.workloads.seq2seq import build
    cfg = s2s_cfg(mapping_corpus, "seq2seq.length_buckets=8", "train.max_steps=2",
                  "train.eval_every=0", "train.eval_steps=1", "seq2seq.eval_pairs=0",
                  "train.peak_flops=1e12")
    logged = logged_losses(cfg, tmp_path / "run")
    w = build(cfg, CPU)
    params = w.layout.init_slice(cfg.train.seed)
    src, src_len, tgt_in, tgt_out = w.train_batch(0, 0, cfg.train.batch_size)
    expected = token_cross_entropy(w.model.logits(params, src, src_len, tgt_in), tgt_out)
    assert len(logged) == 2 and logged[0] == pytest.approx(expected, rel=1e-5)
    # negative control: step 0's bucket is weighted, so the scaled loss would show otherwise
    assert abs(w.bucket_gradient_scales()[w.bucket_of_step(0)] - 1.0) > 0.05


def test_shared_embeddings_need_a_joint_vocabulary_corpus(mapping_corpus, tmp_path):
    from hpcps.data.seqcorpus import SplitItems, write_sequence_corpus
    from hpcps.data.tokenizer import CharTokenizer
    from hpcps.workloads.seq2seq import build
    with pytest.raises(UserError, match="needs one tokenizer for both sides"):
        build(s2s_cfg(mapping_corpus, "seq2seq.share_embeddings=true"), CPU)
    joint = CharTokenizer("".join(sorted(LETTERS + HANZI)))
    pairs = mapping_pairs(64, 3)
    items = SplitItems(tokens={"src": [joint.encode(p[0]) for p in pairs],
                               "tgt": [joint.encode(p[1]) for p in pairs]},
                       texts={"src": [p[0] for p in pairs], "tgt": [p[1] for p in pairs]})
    write_sequence_corpus(str(tmp_path / "joint.h5"), "parallel", {"train": items, "val": items},
                          {"src": joint, "tgt": joint}, {})
    w = build(s2s_cfg(tmp_path / "joint.h5", "seq2seq.share_embeddings=true",
                      "model.tie_embeddings=false"), CPU)
    batch = w.train_batch(0, 0, 4)
    assert w.layout["wte"].shape == (23, 32)                         # 20 chars + PAD, BOS, EOS
    rows = w.touched_rows(batch)
    assert list(rows) == ["wte"] and rows["wte"].tolist() == np.union1d(batch[0],
                                                                         batch[2]).tolist()
    assert build(s2s_cfg(tmp_path / "joint.h5", "seq2seq.share_embeddings=true"),
                 CPU).touched_rows(batch) == {}                     # tied: every row moves


def test_workload_errors(mapping_corpus, shakespeare_corpus):
    from hpcps.workloads.seq2seq import build
    with pytest.raises(UserError, match="data.path"):
        build(load_config(None, ["workload=seq2seq"]), CPU)
    with pytest.raises(UserError, match="not a sequence corpus"):
        build(s2s_cfg(shakespeare_corpus), CPU)
    from hpcps.workloads.bert import build as build_bert
    with pytest.raises(UserError, match="lacks root attribute"):
        build_bert(load_config(None, ["workload=bert", f"data.path={mapping_corpus}"]), CPU)


@pytest.mark.timeout(90)
def test_short_training_beats_the_copy_baseline(mapping_corpus):
    from hpcps.optim import AdamW
    from hpcps.workloads.seq2seq import build
    w = build(s2s_cfg(mapping_corpus, "seq2seq.beam=2", "model.n_embd=64", "model.n_head=4"),
              CPU)
    params = w.model.init_params(1)
    grads = np.empty_like(params)
    opt = AdamW(params.size, w.layout.decay_ranges(), beta2=0.99, weight_decay=0.0)
    before = w.finalize_eval(w.eval_sums(params, 0, 64))
    with blas_threads_limited(1):   # small GEMMs: threads only spin on a busy machine
        for step in range(400):
            w.loss_and_grad(params, grads, w.train_batch(step, 0, 16), step, 0)
            opt.step(params, grads, 2e-3 * min(1.0, (step + 1) / 20))
    after = w.finalize_eval(w.eval_sums(params, 0, 64))
    assert before["val_copy_bleu"] == after["val_copy_bleu"] == 0.0   # letters vs hanzi
    assert before["val_bleu"] < 5
    assert after["val_loss"] < 0.5 * before["val_loss"]
    assert after["val_bleu"] > 50, after
    table = dict(zip(LETTERS, HANZI))
    assert w.translate(params, [w.src.tokenizer.encode("abc")], beam=1) == \
        [table["c"] + table["b"] + table["a"]]
