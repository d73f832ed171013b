"""train.recompute: gradients and losses bit-identical to keeping every activation, for the
GPT blocks (with and without dropout, bias, batch shards) and for the attention core; what
each mode keeps; the float64 gradient check; bad modes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from gradcheck import check_layer_grad

from hpcps.errors import UserError
from hpcps.model import attention
from hpcps.model.attention import attention_backward, attention_forward
from hpcps.model.bert import BertMLM
from hpcps.model.gpt import GPT
from hpcps.model.seq2seq import Seq2Seq
from hpcps.model.workspace import Workspace

pytestmark = pytest.mark.timeout(120)

SHAPE = dict(vocab_size=37, n_layer=3, n_head=4, n_embd=32, block_size=16)


def _grads(model: GPT, keys=None, dtype=np.float32):
    params = model.init_params(5).astype(dtype)
    params += np.random.default_rng(2).standard_normal(params.size).astype(dtype) * 0.05
    grads = np.empty_like(params)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, model.vocab_size, (4, 16))
    targets = rng.integers(0, model.vocab_size, (4, 16))
    targets[1, 3] = -1
    losses = [model.forward_backward(params, grads, idx, targets, keys) for _ in range(2)]
    assert losses[0] == losses[1]   # the workspace reused by a second step changes nothing
    return losses[1], grads


@pytest.mark.parametrize("mode", ["attention", "block"])
@pytest.mark.parametrize("bias,dropout,threads,row_blocks", [
    (False, 0.0, 1, False), (True, 0.0, 2, False), (True, 0.2, 1, False), (False, 0.2, 2, False),
    (True, 0.0, 1, True), (False, 0.2, 2, True)])
def test_gradients_bit_identical_to_none(monkeypatch, mode, bias, dropout, threads, row_blocks):
    if row_blocks:   # causal self-attention in row blocks of 5 (16 tokens: 4 blocks)
        monkeypatch.setattr(attention, "CAUSAL_BLOCKS_FROM", 16)
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", 5)
    kw = dict(SHAPE, bias=bias, dropout=dropout, threads=threads)
    keys = [3, 1, 4, 1] if dropout else None
    loss_none, g_none = _grads(GPT(**kw, recompute="none"), keys)
    loss, g = _grads(GPT(**kw, recompute=mode), keys)
    assert loss == loss_none
    assert np.array_equal(g, g_none)


def test_negative_control_one_ulp_shows_in_the_gradient_bits():
    """The equality above is a sharp check: a one-ulp change to one weight of the first
    block (which block mode recomputes last) already changes the gradient bits."""
    model = GPT(**SHAPE, recompute="block")
    _, g_ref = _grads(model)
    params = model.init_params(5)
    params += np.random.default_rng(2).standard_normal(params.size).astype(np.float32) * 0.05
    spec = model.layout["h0.mlp.fc.w"]
    params.view(np.uint32)[spec.offset] += 1
    grads = np.empty_like(params)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, model.vocab_size, (4, 16))
    targets = rng.integers(0, model.vocab_size, (4, 16))
    targets[1, 3] = -1
    model.forward_backward(params, grads, idx, targets)
    assert not np.array_equal(grads, g_ref)


@pytest.mark.parametrize("mode", ["none", "attention", "block"])
def test_gradient_check_float64(mode):
    model = GPT(**dict(SHAPE, n_layer=2, n_embd=8, n_head=2, vocab_size=11, block_size=6),
                bias=True, recompute=mode, threads=1)
    flat = model.init_params(3).astype(np.float64)
    flat += np.random.default_rng(9).standard_normal(flat.size) * 0.05
    grads, scratch = np.empty_like(flat), np.empty_like(flat)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (3, 5)), rng.integers(0, 11, (3, 5))
    analytic = model.layout.views(grads)

    def forward_loss(_):
        return model.forward_backward(flat, scratch, idx, targets), analytic

    model.forward_backward(flat, grads, idx, targets)
    report = check_layer_grad(forward_loss, model.layout.views(flat), max_checks=12)
    assert report.ok, report


def _workspace_names(mode: str) -> set:
    model = GPT(**SHAPE, recompute=mode, threads=1)
    _grads(model)
    (ws,) = model._workspaces.values()
    return set(ws._buffers)


def test_what_each_mode_keeps():
    none, att, block = (_workspace_names(m) for m in ("none", "attention", "block"))
    per_layer_probs = {f"h{i}.attn.att" for i in range(3)}
    assert per_layer_probs <= none and not per_layer_probs & att
    assert "tmp.attn.chunk" in att and "tmp.attn.chunk" not in none
    inputs = {f"h{i}.input" for i in range(3)}
    assert inputs <= block and not inputs & att
    layer = re.compile(r"h\d+\.")
    assert {n for n in block if layer.match(n)} == inputs   # one shared set of activations
    assert {n for n in att if n.startswith("h2.")} and "blk.attn.qkv.xhat" in block


@pytest.mark.parametrize("causal,bias_heads,row_blocks", [(True, 0, False), (False, 1, False),
                                                          (False, 6, False), (True, 0, True)])
def test_attention_core_chunks_bit_identical(monkeypatch, causal, bias_heads, row_blocks):
    """Heads in chunks of 2 (scratch capped) against one piece; key masks with one or all
    heads; dropout; causal row blocks (``causal_blocks``, made small here); the same
    q/k/v/dq/dk/dv bits."""
    if row_blocks:
        monkeypatch.setattr(attention, "CAUSAL_BLOCKS_FROM", 8)
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
        assert attention.causal_blocks(np, True, None, None, 9, 9) == [(0, 4), (4, 8), (8, 9)]
    rng = np.random.default_rng(1)
    b, h, t, hs = 2, 6, 9, 4
    q, k, v, dy = (rng.standard_normal((b, h, t, hs)).astype(np.float32) for _ in range(4))
    bias = None
    if bias_heads:
        bias = np.zeros((b, bias_heads, 1, t), np.float32)
        bias[0, ..., 7:] = -np.inf
    drop = (rng.random((b, h, t, t)) > 0.3).astype(np.float32) / np.float32(0.7)
    monkeypatch.setattr(attention, "CHUNK_BYTES", 2 * b * t * t * 4)
    assert attention.head_chunk(b, h, t, t, 4) == 2
    outs = []
    for keep in (True, False):
        y, cache = attention_forward(q, k, v, causal=causal, attn_bias=bias, dropout=drop,
                                     ws=Workspace(np), keep_probs=keep)
        outs.append((y.copy(),) + tuple(g.copy() for g in attention_backward(dy, cache)))
    for a, c in zip(*outs):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("row_blocks", [False, True])
def test_attention_core_large_scores_take_the_shift_for_every_head(monkeypatch, row_blocks):
    """One head's scores overflow exp without the max shift: the one-piece softmax then
    shifts every head, and so must the chunks (else the other heads' bits differ)."""
    if row_blocks:
        monkeypatch.setattr(attention, "CAUSAL_BLOCKS_FROM", 4)
        monkeypatch.setattr(attention, "CAUSAL_BLOCK", 2)
    rng = np.random.default_rng(3)
    b, h, t, hs = 1, 4, 5, 8
    q, k, v, dy = (rng.standard_normal((b, h, t, hs)).astype(np.float32) for _ in range(4))
    q[:, 3] *= 200.0
    monkeypatch.setattr(attention, "CHUNK_BYTES", b * t * t * 4)
    outs = []
    for keep in (True, False):
        y, cache = attention_forward(q, k, v, causal=True, ws=Workspace(np), keep_probs=keep)
        outs.append((y.copy(),) + tuple(g.copy() for g in attention_backward(dy, cache)))
    assert np.isfinite(outs[0][0]).all()
    for a, c in zip(*outs):
        assert np.array_equal(a, c)


def test_bad_recompute_mode():
    with pytest.raises(UserError, match="recompute must be one of none, attention, block"):
        GPT(**SHAPE, recompute="layers")


def _bert_grads(mode: str, dropout: float):
    model = BertMLM(vocab_size=13, n_layer=3, n_head=2, n_embd=16, block_size=8, bias=True,
                    dropout=dropout, recompute=mode)
    params = model.init_params(4)
    params += np.random.default_rng(2).standard_normal(params.size).astype(np.float32) * 0.05
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 13, (3, 8))
    targets = np.where(rng.random((3, 8)) < 0.4, rng.integers(0, 13, (3, 8)), -1)
    targets[0, 0] = 2
    grads = np.empty_like(params)
    loss = model.forward_backward(params, grads, idx, targets,
                                  [5, 6, 7] if dropout else None)
    return loss, grads


def _seq2seq_grads(mode: str, dropout: float):
    model = Seq2Seq(src_vocab=10, tgt_vocab=9, n_layer=2, n_dec_layer=2, n_head=2, n_embd=8,
                    max_src_len=7, max_tgt_len=6, bias=True, dropout=dropout, recompute=mode)
    params = model.init_params(4)
    params += np.random.default_rng(2).standard_normal(params.size).astype(np.float32) * 0.3
    rng = np.random.default_rng(6)
    src, src_len = rng.integers(0, 10, (3, 5)), np.array([5, 2, 3])
    tgt_in, tgt_out = rng.integers(0, 9, (3, 4)), rng.integers(0, 9, (3, 4))
    tgt_out[1, 3] = -1
    grads = np.empty_like(params)
    loss = model.forward_backward(params, grads, src, src_len, tgt_in, tgt_out,
                                  [4, 17, 99] if dropout else None)
    return loss, grads


@pytest.mark.parametrize("build", [_bert_grads, _seq2seq_grads])
@pytest.mark.parametrize("mode", ["attention", "block"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_encoder_decoder_blocks_bit_identical_to_none(build, mode, dropout):
    loss_none, g_none = build("none", dropout)
    loss, g = build(mode, dropout)
    assert loss == loss_none
    assert np.array_equal(g, g_none)
