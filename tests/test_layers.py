"""Float64 gradient checks of every model layer, each with a negative control (a
deliberately wrong backward that the checker must reject), plus the fast-path
and helper behaviours the layers rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gradcheck import assert_fails, check_layer_grad, projection

import hpcps.model.attention as attention
import hpcps.model.layers as layers
from hpcps.model.workspace import Workspace

pytestmark = pytest.mark.timeout(60)


def _rng(seed: int = 0):
    return np.random.default_rng(seed)


# -- embedding -------------------------------------------------------------------------

IDX = np.array([[0, 3, 3, 1], [6, 0, 3, 3]])   # repeated rows must sum


def _embedding_loss(backward):
    r = projection(IDX.shape + (5,))

    def forward_loss(p):
        out, cache = layers.embedding_forward(p["w"], IDX)
        grads = {"w": np.zeros_like(p["w"])}
        backward(r, cache, grads["w"])
        return float((out * r).sum()), grads
    return forward_loss


def test_embedding_grad():
    report = check_layer_grad(_embedding_loss(layers.embedding_backward),
                              {"w": _rng().standard_normal((7, 5))})
    assert report.ok, report


def test_embedding_negative_control_drops_repeated_rows():
    def wrong(dout, idx, dw):
        dw[idx.reshape(-1)] += dout.reshape(-1, dw.shape[1])   # buffered: repeats counted once
    assert_fails(check_layer_grad(_embedding_loss(wrong), {"w": _rng().standard_normal((7, 5))}))


@pytest.mark.parametrize("one_hot_limit", [0, 1 << 30])
def test_scatter_add_rows_matches_add_at_on_both_paths(monkeypatch, one_hot_limit):
    monkeypatch.setattr(layers, "ONE_HOT_LIMIT", one_hot_limit)
    rng = _rng(3)
    rows = rng.integers(0, 9, 40)
    values = rng.standard_normal((40, 6)).astype(np.float32)
    target = rng.standard_normal((9, 6)).astype(np.float32)
    expected = target.copy()
    np.add.at(expected, rows, values)
    layers.scatter_add_rows(target, rows, values)
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6)


# -- layer norm ------------------------------------------------------------------------

def _layernorm_loss(backward, bias: bool):
    r = projection((2, 3, 6))

    def forward_loss(p):
        out, cache = layers.layernorm_forward(p["x"], p["w"], p.get("b"))
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        grads["x"] = backward(r, cache, grads["w"], grads.get("b"))
        return float((out * r).sum()), grads
    return forward_loss


def _ln_params(bias: bool) -> dict:
    rng = _rng(1)
    p = {"x": rng.standard_normal((2, 3, 6)) * 2 + 0.5, "w": rng.standard_normal(6)}
    if bias:
        p["b"] = rng.standard_normal(6)
    return p


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_grad(bias):
    report = check_layer_grad(_layernorm_loss(layers.layernorm_backward, bias), _ln_params(bias))
    assert report.ok, report


def test_layernorm_negative_control_drops_variance_term():
    def wrong(dout, cache, dw, db):
        xhat, rstd, w = cache
        d2 = dout.reshape(xhat.shape)
        dw += (d2 * xhat).sum(0)
        db += d2.sum(0)
        dxhat = d2 * w
        return (rstd[:, None] * (dxhat - dxhat.mean(1, keepdims=True))).reshape(dout.shape)
    assert_fails(check_layer_grad(_layernorm_loss(wrong, True), _ln_params(True)))


def test_layernorm_overwrite_mode_ignores_previous_gradient():
    p = _ln_params(True)
    out, cache = layers.layernorm_forward(p["x"], p["w"], p["b"])
    acc_w, acc_b = np.zeros(6), np.zeros(6)
    layers.layernorm_backward(out, cache, acc_w, acc_b)
    new_w, new_b = np.full(6, np.nan), np.full(6, np.nan)
    layers.layernorm_backward(out, cache, new_w, new_b, accumulate=False)
    np.testing.assert_allclose(new_w, acc_w, rtol=1e-12)
    np.testing.assert_allclose(new_b, acc_b, rtol=1e-12)


# -- layer norm fused into the following linear ---------------------------------------

def _ln_linear_loss(ln_bias: bool, bias: bool, scaled: bool, accumulate: bool = True,
                    forget_ln_bias: bool = False):
    r = projection((2, 3, 4))
    scale = np.array([0.5, 2.0, 1.0, 1.0]) if scaled else None

    def forward_loss(p):
        out, cache = layers.layernorm_linear_forward(p["x"], p["g"], p.get("beta"), p["w"],
                                                     p.get("b"), out_scale=scale)
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        grads["x"] = layers.layernorm_linear_backward(r, cache, grads["g"], grads.get("beta"),
                                                      grads["w"], grads.get("b"),
                                                      accumulate=accumulate)
        if forget_ln_bias:   # dW without the outer(colsum(dout), ln_bias) term
            d2 = r.reshape(-1, 4) * (1 if scale is None else scale)
            grads["w"] -= np.outer(d2.sum(0), p["beta"])
        return float((out * r).sum()), grads
    return forward_loss


def _ln_linear_params(ln_bias: bool, bias: bool) -> dict:
    rng = _rng(8)
    p = {"x": rng.standard_normal((2, 3, 6)) + 0.3, "g": rng.standard_normal(6),
         "w": rng.standard_normal((4, 6))}
    if ln_bias:
        p["beta"] = rng.standard_normal(6)
    if bias:
        p["b"] = rng.standard_normal(4)
    return p


@pytest.mark.parametrize("ln_bias,bias,scaled,accumulate", [
    (True, True, False, True), (False, False, False, True), (True, False, True, False),
    (False, True, True, True)])
def test_layernorm_linear_grad(ln_bias, bias, scaled, accumulate):
    report = check_layer_grad(_ln_linear_loss(ln_bias, bias, scaled, accumulate),
                              _ln_linear_params(ln_bias, bias))
    assert report.ok, report


def test_layernorm_linear_equals_layernorm_then_linear():
    p = _ln_linear_params(True, True)
    scale = np.array([0.5, 2.0, 1.0, 3.0])
    fused, _ = layers.layernorm_linear_forward(p["x"], p["g"], p["beta"], p["w"], p["b"],
                                               out_scale=scale)
    normed, _ = layers.layernorm_forward(p["x"], p["g"], p["beta"])
    plain, _ = layers.linear_forward(normed, p["w"], p["b"])
    np.testing.assert_allclose(fused, plain * scale, rtol=1e-12, atol=1e-12)


def test_layernorm_linear_negative_control_forgets_ln_bias_in_weight_grad():
    assert_fails(check_layer_grad(_ln_linear_loss(True, False, True, forget_ln_bias=True),
                                  _ln_linear_params(True, False)))


# -- linear ----------------------------------------------------------------------------

def _linear_loss(backward, out_f: int = 4):
    r = projection((2, 3, out_f))

    def forward_loss(p):
        out, cache = layers.linear_forward(p["x"], p["w"], p["b"])
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        grads["x"] = backward(r, cache, grads["w"], grads["b"])
        return float((out * r).sum()), grads
    return forward_loss


def _linear_params(out_f: int = 4, in_f: int = 5) -> dict:
    rng = _rng(2)
    return {"x": rng.standard_normal((2, 3, in_f)), "w": rng.standard_normal((out_f, in_f)),
            "b": rng.standard_normal(out_f)}


@pytest.mark.parametrize("accumulate", [True, False])
def test_linear_grad(accumulate):
    def backward(dout, cache, dw, db):
        return layers.linear_backward(dout, cache, dw, db, accumulate=accumulate)
    report = check_layer_grad(_linear_loss(backward), _linear_params())
    assert report.ok, report


def test_linear_negative_control_transposed_weight():
    def wrong(dout, cache, dw, db):
        x2, w, shape = cache
        d2 = dout.reshape(-1, w.shape[0])
        dw += d2.T @ x2
        db += d2.sum(0)
        return (d2 @ w.T).reshape(shape)       # should be d2 @ w
    assert_fails(check_layer_grad(_linear_loss(wrong, 5), _linear_params(5, 5)))


def test_linear_accumulates_into_existing_gradient():
    p = _linear_params()
    out, cache = layers.linear_forward(p["x"], p["w"], p["b"])
    dw, db = np.ones((4, 5)), np.ones(4)
    layers.linear_backward(out, cache, dw, db)
    d2 = out.reshape(-1, 4)
    np.testing.assert_allclose(dw, 1 + d2.T @ p["x"].reshape(-1, 5), rtol=1e-12)
    np.testing.assert_allclose(db, 1 + d2.sum(0), rtol=1e-12)


# -- GELU ------------------------------------------------------------------------------

def _gelu_loss():
    r = projection((3, 7))

    def forward_loss(p):
        out, cache = layers.gelu_forward(p["x"])
        return float((out * r).sum()), {"x": layers.gelu_backward(r, cache)}
    return forward_loss


def _gelu_x() -> np.ndarray:
    return np.linspace(-4.0, 4.0, 21).reshape(3, 7) + 0.013


def test_gelu_grad_and_value():
    x = _gelu_x()
    assert check_layer_grad(_gelu_loss(), {"x": x}).ok
    out, _ = layers.gelu_forward(x)
    expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(out, expected, rtol=1e-14, atol=1e-15)


def _drop_cubic_term(monkeypatch) -> None:
    """Make the cached GELU derivative forget d(0.044715 x^3)/dx (the value stays right)."""
    real = layers._gelu_derivative

    def wrong(x, q, h, y, grad):
        q[...] = layers.GELU_K               # as if a = 0 in d/dx: the x^3 term is lost
        real(x, q, h, y, grad)
    monkeypatch.setattr(layers, "_gelu_derivative", wrong)


def test_gelu_negative_control_drops_cubic_term(monkeypatch):
    _drop_cubic_term(monkeypatch)
    assert_fails(check_layer_grad(_gelu_loss(), {"x": _gelu_x()}))


# -- residual --------------------------------------------------------------------------

def _residual_loss(drop_skip: bool):
    r = projection((4, 5))

    def forward_loss(p):
        branch, cache = layers.gelu_forward(p["x"])
        out = layers.residual_forward(p["x"], branch)
        d_skip, d_branch = layers.residual_backward(r)
        dx = layers.gelu_backward(d_branch, cache).copy()
        if not drop_skip:
            dx += d_skip
        return float((out * r).sum()), {"x": dx}
    return forward_loss


def test_residual_grad():
    assert check_layer_grad(_residual_loss(False), {"x": _rng(4).standard_normal((4, 5))}).ok


def test_residual_negative_control_drops_skip_path():
    assert_fails(check_layer_grad(_residual_loss(True), {"x": _rng(4).standard_normal((4, 5))}))


# -- softmax cross-entropy -------------------------------------------------------------

TARGETS = np.array([[2, -1, 0], [4, 4, -1]])


def _xent_loss(backward):
    def forward_loss(p):
        loss, cache = layers.cross_entropy_forward(p["logits"], TARGETS)
        return float(loss), {"logits": backward(cache).reshape(p["logits"].shape).copy()}
    return forward_loss


def test_cross_entropy_grad_and_value():
    logits = _rng(5).standard_normal((2, 3, 5)) * 3
    assert check_layer_grad(_xent_loss(layers.cross_entropy_backward), {"logits": logits}).ok
    loss, _ = layers.cross_entropy_forward(logits, TARGETS)
    l2, t = logits.reshape(-1, 5), TARGETS.reshape(-1)
    logp = l2 - np.log(np.exp(l2).sum(1, keepdims=True))
    expected = -np.mean([logp[i, t[i]] for i in range(len(t)) if t[i] != -1])
    assert float(loss) == pytest.approx(expected, rel=1e-13)


def test_cross_entropy_negative_control_ignores_the_ignore_index():
    def wrong(cache):
        probs, safe_t, valid, count = cache
        probs[np.arange(len(safe_t)), safe_t] -= 1
        return probs / count                   # ignored rows still get a gradient
    logits = _rng(5).standard_normal((2, 3, 5)) * 3
    assert_fails(check_layer_grad(_xent_loss(wrong), {"logits": logits}))


# -- attention -------------------------------------------------------------------------

def _attention_loss(causal: bool, tq: int = 5, tk: int = 5, drop_rowdot: bool = False):
    r = projection((2, 3, tq, 4))

    def forward_loss(p):
        out, cache = attention.attention_forward(p["q"], p["k"], p["v"], causal=causal)
        loss = float((out * r).sum())
        if drop_rowdot:   # softmax backward without the - sum_j dp_j p_j term
            real = np.einsum
            attention.np.einsum = lambda *a, **k: np.zeros_like(real(*a, **k))
            try:
                dq, dk, dv = attention.attention_backward(r, cache)
            finally:
                attention.np.einsum = real
        else:
            dq, dk, dv = attention.attention_backward(r, cache)
        return loss, {"q": dq.copy(), "k": dk.copy(), "v": dv.copy()}
    return forward_loss


def _qkv(tq: int = 5, tk: int = 5) -> dict:
    rng = _rng(6)
    return {"q": rng.standard_normal((2, 3, tq, 4)), "k": rng.standard_normal((2, 3, tk, 4)),
            "v": rng.standard_normal((2, 3, tk, 4))}


@pytest.mark.parametrize("causal,tq,tk", [(True, 5, 5), (False, 5, 5), (False, 3, 6),
                                          (True, 3, 6)])
def test_attention_grad(causal, tq, tk):
    report = check_layer_grad(_attention_loss(causal, tq, tk), _qkv(tq, tk))
    assert report.ok, report


def test_attention_grad_in_causal_row_blocks(monkeypatch):
    """Causal self-attention in row blocks (``causal_blocks``, made small here: rows of
    7 in 3 blocks) against finite differences, and against one piece."""
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_FROM", 6)
    monkeypatch.setattr(attention, "CAUSAL_BLOCK", 3)
    assert attention.causal_blocks(np, True, None, None, 7, 7) == [(0, 3), (3, 6), (6, 7)]
    report = check_layer_grad(_attention_loss(True, 7, 7), _qkv(7, 7))
    assert report.ok, report
    blocked = _attention_loss(True, 7, 7)(_qkv(7, 7))
    monkeypatch.setattr(attention, "CAUSAL_BLOCKS_FROM", 1 << 30)
    whole = _attention_loss(True, 7, 7)(_qkv(7, 7))
    assert blocked[0] == pytest.approx(whole[0], rel=1e-12)
    for name in "qkv":
        np.testing.assert_allclose(blocked[1][name], whole[1][name], rtol=1e-11, atol=1e-13)


def test_attention_negative_control_drops_softmax_rowdot():
    assert_fails(check_layer_grad(_attention_loss(True, drop_rowdot=True), _qkv()))


def _reference_attention(q, k, v, causal, bias=None):
    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = s.shape[-2:]
        s = np.where(np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq), -np.inf, s)
    if bias is not None:
        s = s + bias
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("magnitude", [1.0, 60.0])   # 60: scores ~1e3, the max-shift fallback
def test_attention_matches_reference_softmax(causal, magnitude):
    p = _qkv(4, 6)
    q = (p["q"] * magnitude).astype(np.float32)
    k = (p["k"] * magnitude).astype(np.float32)
    v = p["v"].astype(np.float32)
    out, _ = attention.attention_forward(q, k, v, causal=causal)
    ref = _reference_attention(q.astype(np.float64), k.astype(np.float64),
                               v.astype(np.float64), causal)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5)


def test_attention_bias_masks_keys():
    p = _qkv(3, 5)
    bias = np.zeros((2, 1, 1, 5))
    bias[0, ..., 3:] = -np.inf            # padding: sequence 0 has only 3 real keys
    out, _ = attention.attention_forward(p["q"], p["k"], p["v"], causal=False, attn_bias=bias)
    np.testing.assert_allclose(out, _reference_attention(p["q"], p["k"], p["v"], False, bias),
                               rtol=1e-12, atol=1e-12)
    short, _ = attention.attention_forward(p["q"][:1], p["k"][:1, :, :3], p["v"][:1, :, :3],
                                           causal=False)
    np.testing.assert_allclose(out[:1], short, rtol=1e-12, atol=1e-12)


def _self_attention_loss(bias: bool, wrong_scale: bool = False, fused_ln: bool = False):
    c, h = 8, 2
    r = projection((2, 5, c))

    def forward_loss(p):
        ln = (p["g"], p.get("beta")) if fused_ln else None
        out, cache = attention.self_attention_forward(
            p["x"], p["w_qkv"], p.get("b_qkv"), p["w_proj"], p.get("b_proj"), h, causal=True,
            ln=ln)
        grads = {k: np.zeros_like(v) for k, v in p.items()}
        d_ln = (grads["g"], grads.get("beta")) if fused_ln else None
        grads["x"] = attention.self_attention_backward(
            r, cache, grads["w_qkv"], grads.get("b_qkv"), grads["w_proj"], grads.get("b_proj"),
            d_ln)
        if wrong_scale:   # forgets that the q rows were used scaled by 1/sqrt(hs)
            grads["w_qkv"][:c] *= math.sqrt(c // h)
        return float((out * r).sum()), grads
    return forward_loss


def _self_attention_params(bias: bool, fused_ln: bool = False) -> dict:
    rng = _rng(7)
    p = {"x": rng.standard_normal((2, 5, 8)), "w_qkv": rng.standard_normal((24, 8)) * 0.5,
         "w_proj": rng.standard_normal((8, 8))}
    if bias:
        p["b_qkv"], p["b_proj"] = rng.standard_normal(24), rng.standard_normal(8)
    if fused_ln:
        p["g"] = rng.standard_normal(8)
        if bias:
            p["beta"] = rng.standard_normal(8)
    return p


@pytest.mark.parametrize("bias,fused_ln", [(True, False), (False, False), (True, True),
                                           (False, True)])
def test_self_attention_grad(bias, fused_ln):
    report = check_layer_grad(_self_attention_loss(bias, fused_ln=fused_ln),
                              _self_attention_params(bias, fused_ln))
    assert report.ok, report


def test_self_attention_with_ln_equals_layernorm_then_attention():
    p = _self_attention_params(True, fused_ln=True)
    args = (p["w_qkv"], p["b_qkv"], p["w_proj"], p["b_proj"], 2)
    fused, _ = attention.self_attention_forward(p["x"], *args, ln=(p["g"], p["beta"]))
    normed, _ = layers.layernorm_forward(p["x"], p["g"], p["beta"])
    plain, _ = attention.self_attention_forward(normed, *args)
    np.testing.assert_allclose(fused, plain, rtol=1e-12, atol=1e-12)


def test_self_attention_negative_control_unscaled_q_gradient():
    assert_fails(check_layer_grad(_self_attention_loss(True, wrong_scale=True),
                                  _self_attention_params(True)))


# -- dropout masks and workspace -------------------------------------------------------

def test_dropout_mask_depends_only_on_each_key():
    keys = [11, 5, 2 ** 40 + 3, 11]
    full = layers.dropout_mask(np, keys, 7, (6, 50), 0.25, np.float32)
    assert full.shape == (4, 6, 50) and full.dtype == np.float32
    np.testing.assert_array_equal(full[0], full[3])                       # same key, same mask
    np.testing.assert_array_equal(full[1:3], layers.dropout_mask(np, keys[1:3], 7, (6, 50), 0.25,
                                                                 np.float32))
    assert not np.array_equal(full[0], full[1])
    assert not np.array_equal(full, layers.dropout_mask(np, keys, 8, (6, 50), 0.25, np.float32))
    assert set(np.unique(full)) == {0.0, np.float32(1 / 0.75)}


def test_dropout_mask_keeps_the_expected_fraction():
    mask = layers.dropout_mask(np, np.arange(20), 1, (100, 100), 0.1, np.float64)
    keep = (mask > 0).mean()
    assert abs(keep - 0.9) < 0.005          # 200k draws: 5 sigma is ~0.0034
    assert mask.mean() == pytest.approx(1.0, abs=0.006)


def test_workspace_reuses_buffers_only_when_asked():
    ws = Workspace(np)
    a = ws.get("a", (3, 4), np.float32)
    assert ws.get("a", (3, 4), np.float32) is a
    assert ws.get("a", (3, 5), np.float32) is not a
    fresh = Workspace(np, reuse=False)
    assert fresh.get("a", (2,), np.float64) is not fresh.get("a", (2,), np.float64)
