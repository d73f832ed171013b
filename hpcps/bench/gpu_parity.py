"""Backend parity: the same layer, kernel or model computed with NumPy and with another
array module (CuPy on a GPU), compared as relative errors.

``rel_error(a, b) = max|a - b| / max|b|`` per tensor (the worst over a case's
outputs and gradients). Shared by tests/test_gpu_backend.py (NumPy always, CuPy
when a GPU is present) and benchmarks/gpu_check.py (on the GPU).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hpcps.backend import CPU, Backend
from hpcps.gpu import is_cupy, kernels, to_host
from hpcps.gpu import kernels as K
from hpcps.model import attention, layers
from hpcps.model.gpt import GPT
from hpcps.model.workspace import Workspace
from hpcps.optim.adamw import AdamW

FP64_REL = 1e-10    # float64: the same math in another order
FP32_REL = 1e-5     # float32: the target for the whole model


def rel_error(a, b) -> float:
    a = np.asarray(to_host(a), dtype=np.float64)
    b = np.asarray(to_host(b), dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = float(np.abs(b).max()) if b.size else 0.0
    return float(np.abs(a - b).max() / (scale or 1.0)) if b.size else 0.0


def worst(ours: dict, reference: dict) -> float:
    return max(rel_error(ours[k], reference[k]) for k in reference)


# -- layer cases: name -> fn(xp, dtype) -> {tensor name: array} -------------------------

def _inputs(seed: int, dtype, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _layernorm(xp, dtype):
    x, w, b, r = (xp.asarray(a) for a in _inputs(1, dtype, (3, 5, 24), (24,), (24,), (3, 5, 24)))
    out, cache = layers.layernorm_forward(x * 2 + 0.5, w, b)
    dw, db = xp.zeros_like(w), xp.zeros_like(b)
    dx = layers.layernorm_backward(r, cache, dw, db)
    return {"out": out, "dx": dx, "dw": dw, "db": db}


def _layernorm_linear(xp, dtype):
    x, g, beta, w, b, r = (xp.asarray(a) for a in _inputs(
        2, dtype, (2, 7, 16), (16,), (16,), (12, 16), (12,), (2, 7, 12)))
    scale = xp.asarray(np.linspace(0.5, 2.0, 12).astype(dtype))
    out, cache = layers.layernorm_linear_forward(x, g, beta, w, b, out_scale=scale)
    grads = {k: xp.zeros_like(v) for k, v in (("dg", g), ("dbeta", beta), ("dw", w), ("db", b))}
    dx = layers.layernorm_linear_backward(r, cache, grads["dg"], grads["dbeta"], grads["dw"],
                                          grads["db"])
    return {"out": out, "dx": dx, **grads}


def _linear(xp, dtype):
    x, w, b, r = (xp.asarray(a) for a in _inputs(3, dtype, (4, 6, 10), (8, 10), (8,), (4, 6, 8)))
    out, cache = layers.linear_forward(x, w, b)
    dw, db = xp.zeros_like(w), xp.zeros_like(b)
    dx = layers.linear_backward(r, cache, dw, db)
    return {"out": out, "dx": dx, "dw": dw, "db": db}


def _gelu(xp, dtype):
    x, r = (xp.asarray(a) for a in _inputs(4, dtype, (5, 33), (5, 33)))
    out, cache = layers.gelu_forward(x * 3)
    return {"out": out, "dx": layers.gelu_backward(r, cache)}


def _cross_entropy(xp, dtype):
    (logits,) = _inputs(5, dtype, (3, 4, 37))
    targets = np.random.default_rng(5).integers(0, 37, (3, 4))
    targets[1, 2] = -1
    loss, cache = layers.cross_entropy_forward(xp.asarray(logits * 3), xp.asarray(targets))
    return {"loss": loss, "dlogits": layers.cross_entropy_backward(cache, 0.7)}


def _attention(causal: bool, tq: int, tk: int, dropout: bool):
    def case(xp, dtype):
        q, k, v, r = (xp.asarray(a) for a in _inputs(
            6, dtype, (2, 3, tq, 8), (2, 3, tk, 8), (2, 3, tk, 8), (2, 3, tq, 8)))
        mask = None
        if dropout:
            keep = np.random.default_rng(7).random((2, 3, tq, tk)) > 0.2
            mask = xp.asarray((keep / 0.8).astype(dtype))
        out, cache = attention.attention_forward(q, k, v, causal=causal, dropout=mask)
        dq, dk, dv = attention.attention_backward(r, cache)
        return {"out": out, "dq": dq, "dk": dk, "dv": dv}
    return case


def _self_attention(xp, dtype):
    x, wq, bq, wp, bp, g, beta, r = (xp.asarray(a) for a in _inputs(
        8, dtype, (2, 6, 16), (48, 16), (48,), (16, 16), (16,), (16,), (16,), (2, 6, 16)))
    out, cache = attention.self_attention_forward(x, wq, bq, wp, bp, 4, ln=(g, beta))
    grads = {k: xp.zeros_like(v) for k, v in (("dwq", wq), ("dbq", bq), ("dwp", wp), ("dbp", bp),
                                              ("dg", g), ("dbeta", beta))}
    dx = attention.self_attention_backward(r.reshape(2, 6, 16), cache, grads["dwq"], grads["dbq"],
                                           grads["dwp"], grads["dbp"], (grads["dg"], grads["dbeta"]))
    return {"out": out, "dx": dx, **grads}


def _embedding(xp, dtype):
    w, r = _inputs(9, dtype, (11, 6), (2, 5, 6))
    idx = xp.asarray(np.array([[0, 3, 3, 1, 10], [6, 0, 3, 3, 2]]))
    out, cache = layers.embedding_forward(xp.asarray(w), idx)
    dw = xp.zeros((11, 6), dtype=dtype)
    layers.embedding_backward(xp.asarray(r), cache, dw)
    return {"out": out, "dw": dw}


LAYER_CASES: dict[str, Callable] = {
    "layernorm": _layernorm,
    "layernorm_linear": _layernorm_linear,
    "linear": _linear,
    "gelu": _gelu,
    "cross_entropy": _cross_entropy,
    "attention_causal": _attention(True, 9, 9, False),
    "attention_cross_dropout": _attention(False, 5, 7, True),
    "self_attention": _self_attention,
    "embedding": _embedding,
}


def model_case(xp, dtype, backend=None, *, n_layer: int = 2, n_embd: int = 32, n_head: int = 4,
               vocab: int = 67, block: int = 16, batch: int = 3) -> dict:
    """One GPT forward_backward: loss and the whole flat gradient."""
    backend = backend or (CPU if xp is np else Backend(xp.__name__, xp, 0))
    model = GPT(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                block_size=block, bias=True, tie_embeddings=True, backend=backend, threads=1)
    params_host = model.layout.init_slice(3).astype(dtype)
    params_host += np.random.default_rng(4).standard_normal(params_host.size).astype(dtype) * 0.05
    params = xp.asarray(params_host)
    grads = xp.zeros_like(params)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, vocab, (batch, block))
    targets = rng.integers(0, vocab, (batch, block))
    targets[0, 3] = -1
    loss = model.forward_backward(params, grads, xp.asarray(idx), xp.asarray(targets))
    return {"loss": np.asarray(loss), "grads": grads}


def layer_parity(xp, dtype) -> dict:
    """Case name -> worst relative error of ``xp`` against NumPy, same dtype."""
    return {name: worst(case(xp, dtype), case(np, dtype)) for name, case in LAYER_CASES.items()}


def model_parity(xp, dtype, backend=None) -> float:
    return worst(model_case(xp, dtype, backend), model_case(np, dtype))


def adamw_parity(xp, steps: int = 3) -> float:
    """Worst relative error of params after ``steps`` AdamW updates (xp vs NumPy)."""
    n = 1000
    p0, grads = _inputs(10, np.float32, (n,), (steps, n))
    results = []
    for mod in (xp, np):
        opt = AdamW(n, [(0, 400), (700, 1000)], beta1=0.9, beta2=0.99, weight_decay=0.1, xp=mod)
        p = mod.asarray(p0.copy())
        for s in range(steps):
            opt.step(p, mod.asarray(grads[s]), 1e-2 * (s + 1), grad_scale=0.5)
        results.append({"p": p, "m": opt.m, "v": opt.v})
    return worst(results[0], results[1])


# -- fused kernels against their references ------------------------------------------

def _softmax_backward_layer(xp, datt, att, scale: float):
    """The softmax backward as attention_backward runs it on this backend."""
    if is_cupy(xp):
        kernels.softmax_backward(datt, att, scale)
        return datt
    datt = datt - np.einsum("...ij,...ij->...i", datt, att)[..., None]
    return datt * att * scale


def kernel_parity(xp, dtype) -> dict:
    """Fused op (or, on NumPy, the layer's own code) vs the kernels' NumPy reference
    evaluated in float64 -> worst relative error per op."""
    ws = Workspace(xp, reuse=False)
    out = {}
    (x,) = _inputs(11, np.float64, (7, 45))
    y, d = layers.gelu_forward(xp.asarray((x * 3).astype(dtype)))
    ry, rd = K.gelu_reference((x * 3).astype(dtype).astype(np.float64))
    out["gelu"] = max(rel_error(y, ry), rel_error(d, rd))
    x64 = (x * 2 + 1).astype(dtype).astype(np.float64)
    xhat, rstd = layers.normalize_forward(xp.asarray(x64.astype(dtype)), 1e-5, ws, "ln")
    rxhat, rrstd = K.layernorm_reference(x64, 1e-5)
    (g,) = _inputs(12, dtype, (7, 45))
    dx = layers.normalize_backward(xp.array(g), xhat, rstd, ws)   # works in place
    rdx = K.layernorm_backward_reference(g.astype(np.float64), rxhat, rrstd)
    out["layernorm"] = max(rel_error(xhat, rxhat), rel_error(rstd, rrstd), rel_error(dx, rdx))
    q, k = _inputs(13, dtype, (2, 3, 6, 8), (2, 3, 6, 8))
    scores = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)
    for causal in (True, False):
        att = xp.empty((2, 3, 6, 6), dtype=dtype)
        attention._softmax_scores(xp.asarray(q), xp.asarray(k), att, causal, 0.3, None, ws)
        out[f"softmax_{'causal' if causal else 'full'}"] = rel_error(
            att, K.softmax_reference(scores, 0.3, causal))
    p = K.softmax_reference(scores, 0.3, True)
    (dp,) = _inputs(14, np.float64, p.shape)
    ds = _softmax_backward_layer(xp, xp.asarray(dp.astype(dtype)), xp.asarray(p.astype(dtype)), 0.3)
    out["softmax_backward"] = rel_error(ds, K.softmax_backward_reference(dp, p, 0.3))
    (logits,) = _inputs(15, np.float64, (6, 29))
    logits = (logits * 4).astype(dtype)
    targets = np.array([3, -1, 28, 0, 7, 7])
    loss, cache = layers.cross_entropy_forward(xp.asarray(logits), xp.asarray(targets))
    dlogits = layers.cross_entropy_backward(cache, 0.5)
    rloss, rprobs = K.cross_entropy_reference(logits.astype(np.float64), targets)
    out["cross_entropy"] = max(rel_error(np.asarray(to_host(loss)), np.asarray(rloss)),
                               rel_error(dlogits, K.cross_entropy_backward_reference(
                                   rprobs, targets, dloss=0.5)))
    return out
