"""Whole-model tests of hpcps.model.gpt.GPT: float64 gradient checks (bias / tied /
dropout variants and a negative control), gradient-buffer contract, on_grad_ready,
batch-split dropout, layout / init, input errors, and a short training run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from gradcheck import NotNumpy, break_gelu_derivative, check_layer_grad

from hpcps.backend import Backend
from hpcps.errors import UserError
from hpcps.model.gpt import GPT

pytestmark = pytest.mark.timeout(120)

CORPUS = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
TINY = dict(vocab_size=11, n_layer=2, n_head=2, n_embd=8, block_size=6)


def _batch(model: GPT, b: int = 3, t: int = 5, seed: int = 0, ignore: bool = True):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, model.vocab_size, (b, t))
    targets = rng.integers(0, model.vocab_size, (b, t))
    if ignore:
        targets[0, 1] = -1
    return idx, targets


def _model_grad_report(model: GPT, keys=None, max_checks: int = 12):
    flat = model.init_params(3).astype(np.float64)
    flat += np.random.default_rng(9).standard_normal(flat.size) * 0.05  # move LN/bias off 1 / 0
    grads, scratch = np.empty_like(flat), np.empty_like(flat)
    idx, targets = _batch(model)
    params = model.layout.views(flat)
    analytic = model.layout.views(grads)

    def forward_loss(_):
        loss = model.forward_backward(flat, scratch, idx, targets, keys)
        return loss, analytic

    model.forward_backward(flat, grads, idx, targets, keys)
    return check_layer_grad(forward_loss, params, max_checks=max_checks)


@pytest.mark.parametrize("bias,tie,threads", [(False, True, 1), (True, True, 1),
                                              (False, False, 1), (True, False, 1),
                                              (True, True, 2), (False, False, 3)])
def test_model_gradient_float64(bias, tie, threads):
    report = _model_grad_report(GPT(**TINY, bias=bias, tie_embeddings=tie, threads=threads))
    assert report.ok, report


def test_model_gradient_with_dropout_fixed_keys():
    model = GPT(**TINY, bias=True, dropout=0.3, threads=2)
    report = _model_grad_report(model, keys=[4, 17, 99])
    assert report.ok, report
    idx, targets = _batch(model)
    flat = model.init_params(3).astype(np.float64)
    assert model.forward_backward(flat, np.empty_like(flat), idx, targets, [4, 17, 99]) != \
        pytest.approx(model.loss(flat, idx, targets), rel=1e-6)   # dropout is really applied


def test_model_gradient_negative_control(monkeypatch):
    break_gelu_derivative(monkeypatch)
    report = _model_grad_report(GPT(**TINY))
    assert not report.ok, report
    assert report.errors["h0.mlp.fc.w"] > 100 * report.rtol   # subtle term, still 100x over


@pytest.mark.parametrize("tie,threads", [(True, 1), (False, 1), (True, 2), (False, 2)])
def test_grads_buffer_is_overwritten(tie, threads):
    model = GPT(**TINY, bias=True, tie_embeddings=tie, threads=threads)
    params = model.init_params(1)
    idx, targets = _batch(model, t=4)         # t < block_size: unused wpe rows get 0
    clean, dirty = np.zeros_like(params), np.full_like(params, np.nan)
    model.forward_backward(params, clean, idx, targets)
    model.forward_backward(params, dirty, idx, targets)
    np.testing.assert_array_equal(dirty, clean)
    assert not model.layout.views(clean)["wpe"][4:].any()
    assert model.layout.views(clean)["wpe"][:4].any()


@pytest.mark.parametrize("threads", [1, 2])
def test_on_grad_ready_reports_final_ranges_in_reverse_order(threads):
    model = GPT(**TINY, bias=True, threads=threads)
    params = model.init_params(1)
    grads = np.empty_like(params)
    seen = []
    model.forward_backward(params, grads, *_batch(model),
                           on_grad_ready=lambda lo, hi: seen.append((lo, hi, grads[lo:hi].copy())))
    lay = model.layout
    spans = [(lo, hi) for lo, hi, _ in seen]
    assert spans == [(lay["lnf.w"].offset, lay.total),
                     (lay["h1.ln1.w"].offset, lay["h1.mlp.proj.b"].end),
                     (lay["h0.ln1.w"].offset, lay["h0.mlp.proj.b"].end),
                     (0, lay["wpe"].end)]
    assert sorted(spans)[0][0] == 0 and all(a[1] == b[0] for a, b in zip(sorted(spans),
                                                                         sorted(spans)[1:]))
    for lo, hi, snapshot in seen:
        np.testing.assert_array_equal(snapshot, grads[lo:hi])


@pytest.mark.parametrize("threads", [1, 2])
def test_dropout_masks_survive_a_batch_split(threads):
    model = GPT(**TINY, dropout=0.2, threads=threads)
    params = model.init_params(2).astype(np.float64)
    idx, targets = _batch(model, b=4, ignore=False)
    keys = np.array([7, 1000003, 5, 42])
    g_all, g_a, g_b = (np.empty_like(params) for _ in range(3))
    loss_all = model.forward_backward(params, g_all, idx, targets, keys)
    loss_a = model.forward_backward(params, g_a, idx[:2], targets[:2], keys[:2])
    loss_b = model.forward_backward(params, g_b, idx[2:], targets[2:], keys[2:])
    assert loss_all == pytest.approx((loss_a + loss_b) / 2, rel=1e-12)
    np.testing.assert_allclose(g_all, (g_a + g_b) / 2, rtol=1e-9, atol=1e-14)
    swapped = model.forward_backward(params, g_a, idx[::-1], targets[::-1], keys[::-1])
    assert swapped == pytest.approx(loss_all, rel=1e-12)      # position in the batch is irrelevant


def test_layout_order_and_init():
    model = GPT(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64)
    lay = model.layout
    names = [s.name for s in lay.specs]
    assert names[:4] == ["wte", "wpe", "h0.ln1.w", "h0.attn.qkv.w"]
    assert names[-1] == "lnf.w" and "lm_head.w" not in names and "h0.attn.qkv.b" not in names
    assert lay.total == 804_096
    views = lay.views(model.init_params(1337))
    assert views["wte"].std() == pytest.approx(0.02, rel=0.03)
    assert views["h3.mlp.fc.w"].std() == pytest.approx(0.02, rel=0.03)
    assert views["h2.attn.proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
    assert views["h1.mlp.proj.w"].std() == pytest.approx(0.02 / math.sqrt(8), rel=0.03)
    assert (views["h0.ln2.w"] == 1).all() and (views["lnf.w"] == 1).all()
    assert lay["wte"].decay and lay["h0.mlp.fc.w"].decay and not lay["h0.ln1.w"].decay
    untied = GPT(vocab_size=65, n_layer=1, n_head=4, n_embd=128, block_size=64, bias=True,
                 tie_embeddings=False).layout
    assert [s.name for s in untied.specs][-3:] == ["lnf.w", "lnf.b", "lm_head.w"]
    assert untied["wte"].sparse_rows and not untied["lm_head.w"].sparse_rows
    assert untied["h0.attn.qkv.b"].shape == (384,) and not untied["h0.attn.qkv.b"].decay


def test_flops_per_token_nanogpt_estimate():
    model = GPT(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64)
    # 6 * (804096 - 64*128) + 12 * 4 * 128 * 64
    assert model.flops_per_token() == 5_168_640.0


def test_logits_and_eval_loss_agree():
    model = GPT(**TINY, bias=True)
    params = model.init_params(5)
    idx, targets = _batch(model, ignore=False)
    logits = model.logits(params, idx)
    assert logits.shape == (3, 5, 11) and logits.dtype == np.float32
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    expected = -np.take_along_axis(lp, targets[..., None], -1).mean()
    assert model.loss(params, idx, targets) == pytest.approx(expected, rel=1e-5)
    first = logits.copy()
    model.logits(params, idx[::-1])
    np.testing.assert_array_equal(logits, first)               # a copy, not the workspace
    assert model.forward_backward(params, np.empty_like(params), idx, targets) == \
        pytest.approx(model.loss(params, idx, targets), rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_head=3), "divisible"),
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        GPT(**{**TINY, **kwargs})


@pytest.mark.parametrize("idx,targets,keys,match", [
    (np.zeros((2, 7), int), np.zeros((2, 7), int), None, "block_size"),
    (np.full((2, 3), 11), np.zeros((2, 3), int), None, "token ids"),
    (np.zeros((2, 3), float), np.zeros((2, 3), int), None, "integer"),
    (np.zeros((2, 3), int), np.zeros((2, 4), int), None, "shaped like"),
    (np.zeros((2, 3), int), np.full((2, 3), -2), None, "targets"),
    (np.zeros((2, 3), int), np.zeros((2, 3), int), [1, 2, 3], "dropout_keys"),
])
def test_bad_batches(idx, targets, keys, match):
    model = GPT(**TINY, dropout=0.1)
    params = model.init_params(0)
    with pytest.raises(UserError, match=match):
        model.forward_backward(params, np.empty_like(params), idx, targets, keys)


def test_bad_buffers():
    model = GPT(**TINY)
    params = model.init_params(0)
    idx = np.zeros((2, 3), int)
    with pytest.raises(UserError, match="params must be a flat float buffer"):
        model.loss(params[:-1], idx, idx)
    with pytest.raises(UserError, match="grads buffer"):
        model.forward_backward(params, np.empty(params.size, np.float64), idx, idx)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_batch_shards_in_threads_match_one_shard(dropout):
    """Uneven shards (2, 2, 1), one of them with every target ignored."""
    models = [GPT(**TINY, bias=True, dropout=dropout, threads=n) for n in (1, 3)]
    params = models[0].init_params(6).astype(np.float64)
    idx, targets = _batch(models[0], b=5)
    targets[4] = -1
    keys = [3, 1, 4, 1, 5] if dropout else None
    grads = [np.empty_like(params) for _ in models]
    losses = [m.forward_backward(params, g, idx, targets, keys) for m, g in zip(models, grads)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-10, atol=1e-15)
    assert models[1].loss(params, idx, targets) == pytest.approx(
        models[0].loss(params, idx, targets), rel=1e-12)


def test_batch_shards_restore_blas_threads_and_report_worker_errors(monkeypatch):
    from hpcps.model.blas import blas_threads
    model = GPT(**TINY, threads=2)
    params = model.init_params(0)
    idx, targets = _batch(model, b=4)
    before = blas_threads()
    model.forward_backward(params, np.empty_like(params), idx, targets)
    assert blas_threads() == before
    real = GPT._step

    def fail_in_second_shard(self, P, G, idx_s, *args):
        if idx_s.shape == idx[2:].shape and (idx_s == idx[2:]).all():   # the worker's shard
            raise FloatingPointError("shard 1 broke")
        return real(self, P, G, idx_s, *args)
    monkeypatch.setattr(GPT, "_step", fail_in_second_shard)
    with pytest.raises(FloatingPointError, match="shard 1 broke"):
        model.forward_backward(params, np.empty_like(params), idx, targets)
    assert blas_threads() == before


def test_bad_threads_argument():
    with pytest.raises(UserError, match="threads"):
        GPT(**TINY, threads=0)


def test_gpu_code_path_matches_cpu_path():
    idx, targets = _batch(GPT(**TINY))
    results = []
    for backend in (Backend("numpy", np), Backend("stand-in", NotNumpy("stand_in"))):
        model = GPT(**TINY, bias=True, tie_embeddings=False, backend=backend)
        params = model.init_params(4)
        grads = np.empty_like(params)
        results.append((model.forward_backward(params, grads, idx, targets), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


@pytest.mark.skipif(not CORPUS.exists(), reason="tinyshakespeare corpus not present")
def test_short_training_run_lowers_the_loss():
    from hpcps.optim.adamw import AdamW
    text = CORPUS.read_text()[:200_000]
    vocab = sorted(set(text))
    data = np.array([vocab.index(ch) for ch in text[:50_000]], dtype=np.int64)
    model = GPT(vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=32, block_size=32)
    params = model.init_params(0)
    grads = np.empty_like(params)
    opt = AdamW(params.size, model.layout.decay_ranges(), weight_decay=0.1)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(150):
        starts = rng.integers(0, data.size - 33, 8)
        idx = np.stack([data[s:s + 32] for s in starts])
        tgt = np.stack([data[s + 1:s + 33] for s in starts])
        losses.append(model.forward_backward(params, grads, idx, tgt))
        opt.step(params, grads, 3e-3)
    assert losses[0] == pytest.approx(math.log(len(vocab)), rel=0.05)
    assert np.mean(losses[-10:]) < 2.8      # below the ~3.3 of a unigram model
