"""Recurrent text classifier on the flat parameter buffer, with a hand-written backward.

token embedding -> LSTM or GRU over the string's tokens -> last state or masked
mean over positions -> linear -> softmax cross-entropy over the labels.

Strings of a batch are RIGHT-aligned in a (B, T) array (left padding) with a
(B, T) 0/1 mask. A padded step leaves the state unchanged (``h_t = h_{t-1}``), so
the state stays exactly zero until a string starts, the last state of every
string is ``h[T-1]``, and nothing a string computes depends on the batch's T
(splitting a batch across workers changes only fp32 summation order).

Truncated backprop through time (``bptt`` > 0): the recurrent gradient is cut
between steps whose distance from the string end falls in different blocks of
``bptt`` steps, counted from the end; the forward state still flows through.

Recurrent layers are time-major: inputs (T, B, C), states (T + 1, B, H) with
the zero initial state at index 0. Parameter gradients are ACCUMULATED.
"""

from __future__ import annotations

import math

import numpy as np

from hpcps.backend import CPU, Backend, array_module
from hpcps.errors import UserError
from hpcps.model.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
    scatter_add_bytes,
)
from hpcps.model.layout import ParamLayout

CELLS = ("lstm", "gru")
GATES = {"lstm": 4, "gru": 3}
POOLS = ("last", "mean")
STEP_TEMPORARIES = 8      # (B, H) arrays one time step's elementwise work holds at once


def sigmoid(x):
    """0.5 (1 + tanh(x / 2)): no overflow for large |x| in any dtype."""
    xp = array_module(x)
    return x.dtype.type(0.5) * (1 + xp.tanh(x * x.dtype.type(0.5)))


def bptt_cuts(T: int, bptt: int) -> set:
    """Steps t whose recurrent gradient from step t + 1 is cut (strings end at T - 1)."""
    if bptt <= 0:
        return set()
    return {T - 1 - k for k in range(bptt, T, bptt)}


# -- LSTM --------------------------------------------------------------------------------
# gate order i, f, g, o (as torch.nn.LSTM); one bias (torch has two that add up)

def lstm_forward(x, mask, wx, wh, b):
    """x (T, B, E), mask (T, B) of 0/1 -> (h (T+1, B, H), cache); h[0] is the zero state."""
    xp = array_module(x)
    T, B, _ = x.shape
    H = wh.shape[1]
    pre = (x.reshape(T * B, -1) @ wx.T).reshape(T, B, 4 * H)
    pre += b
    h = xp.zeros((T + 1, B, H), dtype=x.dtype)
    c = xp.zeros((T + 1, B, H), dtype=x.dtype)
    acts = xp.empty((T, B, 4 * H), dtype=x.dtype)
    tanh_c = xp.empty((T, B, H), dtype=x.dtype)
    for t in range(T):
        a = pre[t] + h[t] @ wh.T
        acts[t, :, :2 * H] = sigmoid(a[:, :2 * H])
        acts[t, :, 2 * H:3 * H] = xp.tanh(a[:, 2 * H:3 * H])
        acts[t, :, 3 * H:] = sigmoid(a[:, 3 * H:])
        i, f, g, o = (acts[t, :, k * H:(k + 1) * H] for k in range(4))
        c_new = f * c[t] + i * g
        tanh_c[t] = xp.tanh(c_new)
        m = mask[t][:, None]
        c[t + 1] = m * c_new + (1 - m) * c[t]
        h[t + 1] = m * (o * tanh_c[t]) + (1 - m) * h[t]
    return h, (x, mask, wx, wh, h, c, acts, tanh_c)


def lstm_backward(dh_out, cache, dwx, dwh, db, bptt: int = 0):
    """dh_out (T, B, H): gradient w.r.t. h[1:]. Accumulates dwx, dwh, db; returns dx."""
    x, mask, wx, wh, h, c, acts, tanh_c = cache
    xp = array_module(x)
    T, B, _ = x.shape
    H = wh.shape[1]
    cuts = bptt_cuts(T, bptt)
    da = xp.empty((T, B, 4 * H), dtype=x.dtype)
    dh_rec = xp.zeros((B, H), dtype=x.dtype)
    dc_rec = xp.zeros((B, H), dtype=x.dtype)
    for t in range(T - 1, -1, -1):
        if t in cuts:
            dh_rec[...] = 0
            dc_rec[...] = 0
        m = mask[t][:, None]
        dh = dh_out[t] + dh_rec
        i, f, g, o = (acts[t, :, k * H:(k + 1) * H] for k in range(4))
        dh_new = m * dh
        dc_new = m * dc_rec + dh_new * o * (1 - tanh_c[t] * tanh_c[t])
        da[t, :, :H] = dc_new * g * i * (1 - i)
        da[t, :, H:2 * H] = dc_new * c[t] * f * (1 - f)
        da[t, :, 2 * H:3 * H] = dc_new * i * (1 - g * g)
        da[t, :, 3 * H:] = dh_new * tanh_c[t] * o * (1 - o)
        dc_rec = dc_new * f + (1 - m) * dc_rec
        dh_rec = da[t] @ wh + (1 - m) * dh
    da2 = da.reshape(T * B, 4 * H)
    dwx += da2.T @ x.reshape(T * B, -1)
    dwh += da2.T @ h[:-1].reshape(T * B, H)
    db += da2.sum(axis=0)
    return (da2 @ wx).reshape(x.shape)


# -- GRU ---------------------------------------------------------------------------------
# gate order r, z, n (as torch.nn.GRU): n = tanh(xn + r * (h Whn + bhn)), h' = (1-z) n + z h

def gru_forward(x, mask, wx, wh, bx, bh):
    xp = array_module(x)
    T, B, _ = x.shape
    H = wh.shape[1]
    pre = (x.reshape(T * B, -1) @ wx.T).reshape(T, B, 3 * H)
    pre += bx
    h = xp.zeros((T + 1, B, H), dtype=x.dtype)
    acts = xp.empty((T, B, 3 * H), dtype=x.dtype)   # r, z, n
    hn = xp.empty((T, B, H), dtype=x.dtype)         # h Whn + bhn, before r multiplies it
    for t in range(T):
        a = h[t] @ wh.T + bh
        hn[t] = a[:, 2 * H:]
        acts[t, :, :2 * H] = sigmoid(pre[t, :, :2 * H] + a[:, :2 * H])
        acts[t, :, 2 * H:] = xp.tanh(pre[t, :, 2 * H:] + acts[t, :, :H] * hn[t])
        z, n = acts[t, :, H:2 * H], acts[t, :, 2 * H:]
        m = mask[t][:, None]
        h[t + 1] = m * ((1 - z) * n + z * h[t]) + (1 - m) * h[t]
    return h, (x, mask, wx, wh, h, acts, hn)


def gru_backward(dh_out, cache, dwx, dwh, dbx, dbh, bptt: int = 0):
    x, mask, wx, wh, h, acts, hn = cache
    xp = array_module(x)
    T, B, _ = x.shape
    H = wh.shape[1]
    cuts = bptt_cuts(T, bptt)
    dax = xp.empty((T, B, 3 * H), dtype=x.dtype)    # gradient of the input pre-activations
    dah = xp.empty((T, B, 3 * H), dtype=x.dtype)    # ... and of h Wh + bh
    dh_rec = xp.zeros((B, H), dtype=x.dtype)
    for t in range(T - 1, -1, -1):
        if t in cuts:
            dh_rec[...] = 0
        m = mask[t][:, None]
        dh = dh_out[t] + dh_rec
        r, z, n = (acts[t, :, k * H:(k + 1) * H] for k in range(3))
        dh_new = m * dh
        dn = dh_new * (1 - z) * (1 - n * n)
        dax[t, :, :H] = dn * hn[t] * r * (1 - r)
        dax[t, :, H:2 * H] = dh_new * (h[t] - n) * z * (1 - z)
        dax[t, :, 2 * H:] = dn
        dah[t, :, :2 * H] = dax[t, :, :2 * H]
        dah[t, :, 2 * H:] = dn * r
        dh_rec = dah[t] @ wh + dh_new * z + (1 - m) * dh
    dax2, dah2 = dax.reshape(T * B, 3 * H), dah.reshape(T * B, 3 * H)
    dwx += dax2.T @ x.reshape(T * B, -1)
    dwh += dah2.T @ h[:-1].reshape(T * B, H)
    dbx += dax2.sum(axis=0)
    dbh += dah2.sum(axis=0)
    return (dax2 @ wx).reshape(x.shape)


# -- pooling -----------------------------------------------------------------------------

def pool_forward(h, mask, lengths, pool: str):
    """(B, H) summary of states h (T + 1, B, H): the last state, or the mean of the states
    at the string's positions (mask (T, B); lengths (B,), at least 1)."""
    if pool == "last":
        return h[-1], None
    return (h[1:] * mask[:, :, None]).sum(axis=0) / lengths[:, None], (mask, lengths)


def pool_backward(dp, cache, T: int, pool: str):
    """Gradient w.r.t. h[1:] (T, B, H)."""
    xp = array_module(dp)
    if pool == "last":
        dh = xp.zeros((T,) + dp.shape, dtype=dp.dtype)
        dh[-1] = dp
        return dh
    mask, lengths = cache
    return mask[:, :, None] * (dp / lengths[:, None])[None, :, :]


# -- the model ---------------------------------------------------------------------------

def build_layout(vocab_size: int, n_labels: int, embed_dim: int, hidden: int,
                 cell: str) -> ParamLayout:
    lay = ParamLayout()
    lay.add("emb", (vocab_size, embed_dim), std=1.0)
    gates = GATES[cell] * hidden
    lay.add("rnn.wx", (gates, embed_dim), std=1.0 / math.sqrt(embed_dim))
    lay.add("rnn.wh", (gates, hidden), std=1.0 / math.sqrt(hidden))
    if cell == "lstm":
        lay.add("rnn.b", (gates,))
    else:
        lay.add("rnn.bx", (gates,))
        lay.add("rnn.bh", (gates,))
    lay.add("cls.w", (n_labels, hidden), std=1.0 / math.sqrt(hidden))
    lay.add("cls.b", (n_labels,))
    return lay


def pad_left(sequences: list, max_len: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-align the first ``max_len`` tokens of each sequence: (tokens (B, T), lengths (B,)).
    T is the longest kept length of the batch (at least 1). An empty string keeps the
    zero state: its logits are the classifier bias."""
    kept = [np.asarray(s[:max_len], dtype=np.int64) for s in sequences]
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    T = max(1, int(lengths.max())) if len(kept) else 1
    tokens = np.full((len(kept), T), pad, dtype=np.int64)
    for row, seq in enumerate(kept):
        tokens[row, T - len(seq):] = seq
    return tokens, lengths


class RNNClassifier:
    def __init__(self, *, vocab_size: int, n_labels: int, embed_dim: int, hidden: int,
                 cell: str = "lstm", pool: str = "last", bptt: int = 0,
                 backend: Backend = CPU):
        for key, val in (("vocab_size", vocab_size), ("n_labels", n_labels),
                         ("embed_dim", embed_dim), ("hidden", hidden)):
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
                raise UserError(f"RNN {key} must be a positive integer, got {val!r}")
        if cell not in CELLS:
            raise UserError(f"unknown RNN cell {cell!r} (choose from {', '.join(CELLS)})")
        if pool not in POOLS:
            raise UserError(f"unknown RNN pooling {pool!r} (choose from {', '.join(POOLS)})")
        if bptt < 0:
            raise UserError(f"RNN bptt must be >= 0, got {bptt}")
        self.vocab_size, self.n_labels = int(vocab_size), int(n_labels)
        self.embed_dim, self.hidden = int(embed_dim), int(hidden)
        self.cell, self.pool, self.bptt = cell, pool, int(bptt)
        self.backend = backend
        self.layout = build_layout(self.vocab_size, self.n_labels, self.embed_dim, self.hidden,
                                   cell)

    # -- forward / backward ----------------------------------------------------------
    def _inputs(self, tokens, lengths, dtype):
        """Time-major mask (T, B) and lengths in the params' dtype, on the params' device."""
        xp = array_module(tokens)
        T = tokens.shape[1]
        steps = xp.arange(T)[:, None]
        mask = (steps >= (T - lengths)[None, :]).astype(dtype)
        return mask, xp.maximum(lengths, 1).astype(dtype)    # the mean of no state is 0

    def _forward(self, P, tokens, lengths):
        if tokens.ndim != 2 or lengths.shape != (tokens.shape[0],):
            raise UserError(f"RNN batch needs tokens (B, T) and lengths (B,), got "
                            f"{tuple(tokens.shape)} and {tuple(lengths.shape)}")
        mask, flengths = self._inputs(tokens, lengths, P["emb"].dtype)
        x, emb_cache = embedding_forward(P["emb"], tokens.T)
        if self.cell == "lstm":
            h, rnn_cache = lstm_forward(x, mask, P["rnn.wx"], P["rnn.wh"], P["rnn.b"])
        else:
            h, rnn_cache = gru_forward(x, mask, P["rnn.wx"], P["rnn.wh"], P["rnn.bx"],
                                       P["rnn.bh"])
        pooled, pool_cache = pool_forward(h, mask, flengths, self.pool)
        logits, cls_cache = linear_forward(pooled, P["cls.w"], P["cls.b"])
        return logits, (emb_cache, rnn_cache, pool_cache, cls_cache, tokens.shape[1])

    def _backward(self, G, dlogits, caches) -> None:
        emb_cache, rnn_cache, pool_cache, cls_cache, T = caches
        dpooled = linear_backward(dlogits, cls_cache, G["cls.w"], G["cls.b"])
        dh = pool_backward(dpooled, pool_cache, T, self.pool)
        if self.cell == "lstm":
            dx = lstm_backward(dh, rnn_cache, G["rnn.wx"], G["rnn.wh"], G["rnn.b"], self.bptt)
        else:
            dx = gru_backward(dh, rnn_cache, G["rnn.wx"], G["rnn.wh"], G["rnn.bx"],
                              G["rnn.bh"], self.bptt)
        embedding_backward(dx, emb_cache, G["emb"])

    def forward_backward(self, params, grads, tokens, lengths, labels) -> float:
        """Overwrite ``grads`` with d(mean cross-entropy)/d(params); return the mean loss."""
        P, G = self.layout.views(params), self.layout.views(grads)
        logits, caches = self._forward(P, tokens, lengths)
        loss, xent_cache = cross_entropy_forward(logits, labels)
        grads.fill(0)
        self._backward(G, cross_entropy_backward(xent_cache), caches)
        return float(loss)

    def logits(self, params, tokens, lengths):
        return self._forward(self.layout.views(params), tokens, lengths)[0]

    def flops_per_token(self) -> float:
        gates = GATES[self.cell] * self.hidden
        return 6.0 * gates * (self.embed_dim + self.hidden)

    # -- memory (the start-up check) -------------------------------------------------
    def memory_bytes(self, batch: int, steps: int, eval_batch: int = 0, item: int = 4) -> dict:
        """{activations, logits, scratch} at the peak of a training step over ``batch``
        strings padded to ``steps`` tokens, or of an evaluation forward over ``eval_batch``
        strings when that is larger. Nothing outlives a step (there is no workspace), so
        the peak is the largest set of arrays alive at once: the forward's cache (inputs,
        states, gate activations) with the pre-activations at the end of the forward, or
        with the gradients of the states, gates and inputs at the end of the recurrent
        backward, or with the embedding's scatter."""
        train = self._step_bytes(batch, steps, item, backward=True)
        if not eval_batch:
            return train
        evaluation = self._step_bytes(eval_batch, steps, item, backward=False)
        return max(train, evaluation, key=lambda terms: sum(terms.values()))

    def _step_bytes(self, b: int, t: int, item: int, backward: bool) -> dict:
        e, hid = self.embed_dim, self.hidden
        lstm = self.cell == "lstm"
        x = t * b * e * item                            # embedded inputs, and later dx
        states = (t + 1) * b * hid * item               # h (and the LSTM's c)
        gates = t * b * GATES[self.cell] * hid * item   # pre-activations, activations, grads
        per_step = t * b * hid * item                   # tanh(c) or h Whn; d(h); mean pool
        rows = STEP_TEMPORARIES * b * hid * item
        cache = x + (2 if lstm else 1) * states + gates + per_step + t * b * item   # + mask
        peak = gates + rows                             # end of the forward: pre-activations
        if self.pool == "mean":
            peak = max(peak, per_step)
        if backward:
            gate_grads = (1 if lstm else 2) * gates    # da, or the GRU's dax and dah
            weight_tmp = GATES[self.cell] * hid * max(e, hid) * item
            recurrent = per_step + gate_grads + x + rows + weight_tmp
            # the scatter's row ids are a copy: the lookup read the tokens transposed
            lookup = per_step + x + 8 * t * b + scatter_add_bytes(t * b, self.vocab_size, e,
                                                                  item)
            peak = max(peak, recurrent, lookup)
        logits = 2 * b * self.n_labels * item           # logits and probabilities
        return {"activations": cache, "logits": logits, "scratch": peak + 8 * b * t}


def predict(logits) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels, log-softmax rows) of host logits, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return log_probs.argmax(axis=1), log_probs


def nll(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -log_probs[np.arange(len(labels)), labels]


def check_labels(labels, n_labels: int) -> None:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise UserError(f"label {int(labels.max())} is outside the {n_labels} classes")
