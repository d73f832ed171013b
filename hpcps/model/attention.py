"""Scaled dot-product multi-head attention: the core (any q / kv source, causal or
not) and the fused-QKV self-attention block GPT uses.

The core takes q (B, H, Tq, hs) and k, v (B, H, Tk, hs) as strided views (the
last axis contiguous), so heads are sliced out of a projection without copies,
and encoder self-attention (``causal=False``) or decoder cross-attention
(q from the decoder, k / v from the encoder) reuse the same two functions.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hpcps.backend import array_module
from hpcps.gpu import is_cupy, kernels
from hpcps.model.layers import (
    layernorm_linear_backward,
    layernorm_linear_forward,
    linear_backward,
    linear_forward,
    matmul,
    ones,
)
from hpcps.model.workspace import Workspace, scratch


def causal_bias(ws: Workspace, tq: int, tk: int, dtype):
    """(tq, tk) additive mask: 0 where query i may see key j (j <= i + tk - tq), else -inf."""
    def init(buf) -> None:
        xp = ws.xp
        buf.fill(0)
        buf[xp.arange(tk)[None, :] > (xp.arange(tq)[:, None] + (tk - tq))] = -xp.inf
    return ws.constant(f"causal.{tq}.{tk}.{np.dtype(dtype).name}", (tq, tk), dtype, init)


# softmax without the max shift is exact when every row sum stays in this range: no
# term overflowed, and terms lost to underflow are < e^-20 of the row's largest
_SUM_LO, _SUM_HI = math.exp(-60.0), math.exp(80.0)

CAUSAL_BLOCK = 128         # query rows per block of causal self-attention on the CPU
CAUSAL_BLOCKS_FROM = 512   # sequences at least this long run in blocks (shorter: one piece)


def causal_blocks(xp, causal: bool, attn_bias, dropout, tq: int, tk: int):
    """Row blocks (a, e) of causal self-attention on the CPU, or None for one piece.

    Rows a..e see keys 0..e only, so the scores, probabilities and their gradients right
    of a block's last key are never computed, stored or read: at T = 1024 in blocks of
    128 that is 44 % of the attention's GEMM and softmax work (PyTorch's CPU attention
    skips it too). Each block is a GEMM of its own, so the sums differ in the last bits
    from one piece; every path (kept or recomputed probabilities) uses the same blocks."""
    if xp is not np or not causal or attn_bias is not None or tq != tk or tq < CAUSAL_BLOCKS_FROM:
        return None
    if dropout is not None and tuple(dropout.shape[-2:]) != (tq, tk):
        return None
    return [(a, min(tq, a + CAUSAL_BLOCK)) for a in range(0, tq, CAUSAL_BLOCK)]


def _probs_times_v(probs, v, out, blocks) -> None:
    """out = probs v (blocks: each row block with its own keys only)."""
    if blocks is None:
        matmul(probs, v, out=out)
        return
    for a, e in blocks:
        matmul(probs[..., a:e, :e], v[..., :e, :], out=out[..., a:e, :])


def _apply_mask(att, mask, probs, blocks) -> None:
    """probs = att * mask (a dropout mask), only where the blocks computed att."""
    if blocks is None:
        array_module(att).multiply(att, mask, out=probs)
        return
    for a, e in blocks:
        np.multiply(att[..., a:e, :e], mask[..., a:e, :e], out=probs[..., a:e, :e])


def _normalize(att, total, blocks) -> None:
    """att *= 1 / row sums (``total`` holds the reciprocals)."""
    if blocks is None:
        att *= total[..., None]
        return
    for a, e in blocks:
        att[..., a:e, :e] *= total[..., a:e, None]


def attention_forward(q, k, v, *, causal: bool, scale: Optional[float] = None, attn_bias=None,
                      dropout=None, out=None, ws: Optional[Workspace] = None, name: str = "attn",
                      keep_probs: bool = True):
    """y = dropout(softmax(scale * q k^T + bias)) v, per head.

    scale: defaults to 1/sqrt(hs); pass 1.0 when q is already scaled (the fused
    self-attention folds it into the q weights). attn_bias: optional additive
    mask broadcastable to (B, H, Tq, Tk) (-inf for keys to ignore; every query
    must keep at least one key). dropout: an optional 0 / 1/(1-p) mask
    broadcastable to the probabilities. out: optional (B, H, Tq, hs) array (may
    be a transposed view) that receives y.
    keep_probs=False (activation recomputation): the (Tq, Tk) probabilities are
    computed a few heads at a time in one shared scratch buffer and not kept; the
    backward computes them again, bit for bit (``_recomputed_forward``).
    """
    xp = array_module(q)
    ws = scratch(ws, xp)
    b, h, tq, hs = q.shape
    tk = k.shape[2]
    dt = q.dtype
    scale = 1.0 / math.sqrt(hs) if scale is None else float(scale)
    if out is None:
        out = ws.get(name + ".y", (b, h, tq, hs), dt)
    if not keep_probs:
        return out, _recomputed_forward(q, k, v, causal, scale, attn_bias, dropout, out, ws)
    att = ws.get(name + ".att", (b, h, tq, tk), dt)
    blocks = causal_blocks(xp, causal, attn_bias, dropout, tq, tk)
    _softmax_scores(q, k, att, causal, scale, attn_bias, ws, blocks)
    probs = att
    if dropout is not None:
        probs = ws.get(name + ".att_drop", att.shape, dt)
        _apply_mask(att, dropout, probs, blocks)
    _probs_times_v(probs, v, out, blocks)
    return out, (q, k, v, att, probs, dropout, scale, blocks)


def _softmax_scores(q, k, att, causal: bool, scale: float, attn_bias, ws: Workspace,
                    blocks=None) -> None:
    """att = softmax(scale * q k^T + masks) over the last axis, in place.

    On the CPU the max shift (a slow row reduction) is skipped when the row sums
    prove it unnecessary; otherwise, and always on a GPU (where the check would
    synchronise), the scores are recomputed with the shift. On CuPy one fused
    kernel does mask, scale, shift, exp and normalisation (no extra mask array).
    """
    if is_cupy(ws.xp) and attn_bias is None and _fused_softmax_fits(att.shape[-1]):
        matmul(q, k.swapaxes(-1, -2), out=att)
        kernels.softmax_forward(att, scale, causal)
        return
    cpu = ws.xp is np
    if cpu:
        with np.errstate(over="ignore"):   # an overflow is caught by the range check below
            total = _exp_scores(q, k, att, causal, scale, attn_bias, ws, False, blocks)
    else:
        total = _exp_scores(q, k, att, causal, scale, attn_bias, ws, True, blocks)
    if cpu and not (_SUM_LO <= total.min() and total.max() <= _SUM_HI):
        total = _exp_scores(q, k, att, causal, scale, attn_bias, ws, True, blocks)
    ws.xp.reciprocal(total, out=total)
    _normalize(att, total, blocks)


def _fused_softmax_fits(tk: int) -> bool:
    return kernels.softmax_supported(tk)


def _exp_scores(q, k, att, causal: bool, scale: float, attn_bias, ws: Workspace, shift: bool,
                blocks=None):
    """att = exp(scale * (q k^T + masks - [row max])); returns the row sums. ``blocks``:
    causal row blocks (``causal_blocks``), each with its own keys only."""
    dt = att.dtype
    mask = causal_bias(ws, att.shape[-2], att.shape[-1], dt) if causal else None
    if blocks is None:
        return _exp_part(q, k, att, mask, attn_bias, scale, shift, ws)
    total = np.empty(att.shape[:-1], dtype=dt)
    for a, e in blocks:
        total[..., a:e] = _exp_part(q[..., a:e, :], k[..., :e, :], att[..., a:e, :e],
                                    mask[a:e, :e], None, scale, shift, ws)
    return total


def _exp_part(q, k, att, mask, attn_bias, scale: float, shift: bool, ws: Workspace):
    """att = exp(scale * (q k^T + mask + bias - [row max])) for these rows and keys."""
    xp, dt = ws.xp, att.dtype
    matmul(q, k.swapaxes(-1, -2), out=att)
    if mask is not None:
        att += mask
    if attn_bias is not None:
        att += attn_bias
    if shift:
        att -= att.max(axis=-1, keepdims=True)
    if scale != 1.0:
        att *= dt.type(scale)
    xp.exp(att, out=att)
    return xp.matmul(att, ones(ws, att.shape[-1], dt))


def attention_backward(dy, cache, dq=None, dk=None, dv=None, ws: Optional[Workspace] = None,
                       name: str = "attn"):
    """Gradients w.r.t. q, k, v, written into dq / dk / dv when given (may be strided views)."""
    q, k, v = cache[:3]
    xp = array_module(q)
    ws = scratch(ws, xp)
    dt = q.dtype
    dq = ws.get(name + ".dq", q.shape, dt) if dq is None else dq
    dk = ws.get(name + ".dk", k.shape, dt) if dk is None else dk
    dv = ws.get(name + ".dv", v.shape, dt) if dv is None else dv
    if isinstance(cache, _Recomputed):
        _recomputed_backward(dy, cache, dq, dk, dv, ws)
        return dq, dk, dv
    _, _, _, att, probs, dropout, scale, blocks = cache
    datt = ws.get("tmp.attn.datt", att.shape, dt)
    _probs_backward(dy, q, k, v, att, probs, dropout, scale, dq, dk, dv, datt, ws, blocks)
    return dq, dk, dv


def _probs_backward(dy, q, k, v, att, probs, dropout, scale: float, dq, dk, dv, datt,
                    ws: Workspace, blocks=None) -> None:
    """The backward through probs v and the softmax, given the forward's probabilities."""
    xp = ws.xp
    dt = q.dtype
    if blocks is not None:
        _probs_backward_blocks(dy, q, k, v, att, probs, dropout, scale, dq, dk, dv, datt, blocks)
        return
    matmul(probs.swapaxes(-1, -2), dy, out=dv)
    matmul(dy, v.swapaxes(-1, -2), out=datt)
    if dropout is not None:
        datt *= dropout
    # softmax backward: ds = p * (dp - sum_j dp p), then the scale of the scores
    if is_cupy(xp) and _fused_softmax_fits(att.shape[-1]):
        kernels.softmax_backward(datt, att, scale)
    else:
        rowdot = xp.einsum("bhij,bhij->bhi", datt, att)
        datt -= rowdot[..., None]
        datt *= att
        if scale != 1.0:
            datt *= dt.type(scale)
    matmul(datt, k, out=dq)
    matmul(datt.swapaxes(-1, -2), q, out=dk)


def _probs_backward_blocks(dy, q, k, v, att, probs, dropout, scale: float, dq, dk, dv, datt,
                           blocks) -> None:
    """``_probs_backward`` of causal self-attention in row blocks. Key block a..e is seen by
    rows a.. only, so dv and dk of those keys are one GEMM each over those rows (no sums
    across blocks); dq of row block a..e needs keys 0..e."""
    dt = q.dtype
    for a, e in blocks:
        matmul(probs[..., a:, a:e].swapaxes(-1, -2), dy[..., a:, :], out=dv[..., a:e, :])
    for a, e in blocks:
        d, p = datt[..., a:e, :e], att[..., a:e, :e]
        matmul(dy[..., a:e, :], v[..., :e, :].swapaxes(-1, -2), out=d)
        if dropout is not None:
            d *= dropout[..., a:e, :e]
        rowdot = np.einsum("bhij,bhij->bhi", d, p)
        d -= rowdot[..., None]
        d *= p
        if scale != 1.0:
            d *= dt.type(scale)
        matmul(d, k[..., :e, :], out=dq[..., a:e, :])
    for a, e in blocks:
        matmul(datt[..., a:, a:e].swapaxes(-1, -2), q[..., a:, :], out=dk[..., a:e, :])


# -- recomputed probabilities (train.recompute) -------------------------------------------

CHUNK_BYTES = 16 << 20   # a head group's (B, heads, Tq, Tk) scores stay about this size


class _Recomputed(tuple):
    """(q, k, v, attn_bias, dropout, scale, causal, shift, heads per chunk): what the
    backward needs to compute the probabilities again exactly as the forward did."""


def head_chunk(b: int, h: int, tq: int, tk: int, itemsize: int) -> int:
    """Heads per chunk: the largest divisor of h whose scores fit CHUNK_BYTES (at least 1),
    so every chunk has the same shape and reuses one scratch buffer."""
    per_head = b * tq * tk * itemsize
    return max([d for d in range(1, h + 1) if h % d == 0 and d * per_head <= CHUNK_BYTES] or [1])


def _head_slice(mask, lo: int, hi: int):
    """Heads lo..hi of a mask broadcastable to (B, H, Tq, Tk) (a size-1 head axis stays)."""
    if mask is None or mask.ndim < 4 or mask.shape[-3] == 1:
        return mask
    return mask[..., lo:hi, :, :]


def _chunk_probs(q, k, att, causal: bool, scale: float, attn_bias, ws: Workspace,
                 shift: bool, blocks=None) -> bool:
    """att = softmax of one head group's scores, in place, as ``_softmax_scores`` computes it
    (same operations per head). Returns False when, without the shift, a row sum left the
    safe range: the caller then starts again with ``shift`` for every head, as the
    one-piece softmax does."""
    if is_cupy(ws.xp):
        _softmax_scores(q, k, att, causal, scale, attn_bias, ws)
        return True
    with np.errstate(over="ignore"):
        total = _exp_scores(q, k, att, causal, scale, attn_bias, ws, shift, blocks)
    if not shift and not (_SUM_LO <= total.min() and total.max() <= _SUM_HI):
        return False
    np.reciprocal(total, out=total)
    _normalize(att, total, blocks)
    return True


def _chunks(cache: "_Recomputed"):
    q = cache[0]
    h, hc = q.shape[1], cache[8]
    return [(lo, lo + hc) for lo in range(0, h, hc)]


def _blocks(cache: "_Recomputed"):
    """The row blocks of a recomputed attention (the same as its forward's)."""
    q, k, _, attn_bias, dropout, _, causal = cache[:7]
    return causal_blocks(array_module(q), causal, attn_bias, dropout, q.shape[2], k.shape[2])


def _recomputed_forward(q, k, v, causal: bool, scale: float, attn_bias, dropout, out,
                        ws: Workspace) -> "_Recomputed":
    b, h, tq, _ = q.shape
    tk = k.shape[2]
    hc = head_chunk(b, h, tq, tk, q.dtype.itemsize)
    shift = ws.xp is not np
    while True:
        cache = _Recomputed((q, k, v, attn_bias, dropout, scale, causal, shift, hc))
        if all(_chunk_forward(cache, lo, hi, out, ws) for lo, hi in _chunks(cache)):
            return cache
        shift = True


def _chunk_forward(cache: "_Recomputed", lo: int, hi: int, out, ws: Workspace) -> bool:
    v, dropout = cache[2], cache[4]
    att = _chunk_scores(cache, lo, hi, ws)
    if att is None:
        return False
    blocks = _blocks(cache)
    probs = att
    if dropout is not None:
        probs = ws.get("tmp.attn.chunk_drop", att.shape, att.dtype)
        _apply_mask(att, _head_slice(dropout, lo, hi), probs, blocks)
    _probs_times_v(probs, v[:, lo:hi], out[:, lo:hi], blocks)
    return True


def _chunk_scores(cache: "_Recomputed", lo: int, hi: int, ws: Workspace):
    """The probabilities of heads lo..hi in the shared scratch buffer (None: see
    ``_chunk_probs``)."""
    q, k, _, attn_bias, _, scale, causal, shift, _ = cache
    b, _, tq, _ = q.shape
    att = ws.get("tmp.attn.chunk", (b, hi - lo, tq, k.shape[2]), q.dtype)
    ok = _chunk_probs(q[:, lo:hi], k[:, lo:hi], att, causal, scale,
                      _head_slice(attn_bias, lo, hi), ws, shift, _blocks(cache))
    return att if ok else None


def _recomputed_backward(dy, cache: "_Recomputed", dq, dk, dv, ws: Workspace) -> None:
    q, k, v, _, dropout, scale, _, _, _ = cache
    blocks = _blocks(cache)
    for lo, hi in _chunks(cache):
        att = _chunk_scores(cache, lo, hi, ws)
        mask = _head_slice(dropout, lo, hi)
        probs = att
        if mask is not None:
            probs = ws.get("tmp.attn.chunk_drop", att.shape, att.dtype)
            _apply_mask(att, mask, probs, blocks)
        datt = ws.get("tmp.attn.chunk_datt", att.shape, att.dtype)
        _probs_backward(dy[:, lo:hi], q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], att, probs, mask,
                        scale, dq[:, lo:hi], dk[:, lo:hi], dv[:, lo:hi], datt, ws, blocks)


def split_heads(x, n_head: int):
    """(B, T, C) -> (B, H, T, hs) view."""
    b, t, c = x.shape
    return x.reshape(b, t, n_head, c // n_head).transpose(0, 2, 1, 3)


def q_scale(ws: Workspace, c: int, n_head: int, dtype):
    """(3C,) factors: 1/sqrt(hs) on the q features, 1 on k and v (cached)."""
    def init(buf) -> None:
        buf.fill(1)
        buf[:c] = 1.0 / math.sqrt(c // n_head)
    return ws.constant(f"qscale.{c}.{n_head}.{np.dtype(dtype).name}", (3 * c,), dtype, init)


def self_attention_forward(x, w_qkv, b_qkv, w_proj, b_proj, n_head: int, *, causal: bool = True,
                           ln=None, attn_bias=None, attn_dropout=None, out=None,
                           ws: Optional[Workspace] = None, name: str = "attn",
                           keep_probs: bool = True):
    """Fused q/k/v projection (w_qkv: (3C, C), rows q | k | v), attention, output projection.

    ln: optional (weight, bias-or-None) of a pre-LayerNorm applied to x first; it
    is fused into the q/k/v projection. The 1/sqrt(hs) score scale is folded into
    the q rows of the projection (a weight-sized pass instead of two score-sized).
    attn_bias: optional additive score bias broadcast over (B, H, T, T), e.g. a key
    padding mask (0 or -inf per key).
    out: optional (B*T, C) array for the result (the backward does not need it).
    keep_probs: see ``attention_forward``.
    """
    xp = array_module(x)
    ws = scratch(ws, xp)
    b, t, c = x.shape
    hs = c // n_head
    scale = q_scale(ws, c, n_head, x.dtype)
    if ln is not None:
        qkv, qkv_cache = layernorm_linear_forward(x, ln[0], ln[1], w_qkv, b_qkv, out_scale=scale,
                                                  ws=ws, name=name + ".qkv")
    else:
        w_eff = ws.get(name + ".qkv.w_eff", w_qkv.shape, w_qkv.dtype)
        xp.multiply(w_qkv, scale[:, None], out=w_eff)
        b_eff = None
        if b_qkv is not None:
            b_eff = ws.get(name + ".qkv.b_eff", b_qkv.shape, b_qkv.dtype)
            xp.multiply(b_qkv, scale, out=b_eff)
        qkv, qkv_cache = linear_forward(x, w_eff, b_eff, ws, name + ".qkv")
    heads = qkv.reshape(b, t, 3, n_head, hs)
    q, k, v = (heads[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    y = ws.get(name + ".y", (b, t, n_head, hs), x.dtype)
    _, att_cache = attention_forward(q, k, v, causal=causal, scale=1.0, attn_bias=attn_bias,
                                     dropout=attn_dropout, out=y.transpose(0, 2, 1, 3), ws=ws,
                                     name=name, keep_probs=keep_probs)
    out, proj_cache = linear_forward(y.reshape(b, t, c), w_proj, b_proj, ws, name + ".proj", out)
    return out, (qkv_cache, att_cache, proj_cache, n_head, scale, ln is not None)


def self_attention_backward(dout, cache, dw_qkv, db_qkv, dw_proj, db_proj, d_ln=None,
                            ws: Optional[Workspace] = None, name: str = "attn",
                            accumulate: bool = True):
    """Returns dx. d_ln: (d_weight, d_bias-or-None) when the forward had ``ln``.
    accumulate=False overwrites the parameter gradients instead of adding."""
    qkv_cache, att_cache, proj_cache, n_head, scale, fused_ln = cache
    xp = array_module(dout)
    ws = scratch(ws, xp)
    b, t, c = dout.shape
    hs = c // n_head
    dy = linear_backward(dout, proj_cache, dw_proj, db_proj, ws, name + ".proj",
                         accumulate=accumulate)
    dqkv = ws.get(name + ".dqkv", (b, t, 3, n_head, hs), dout.dtype)
    dq, dk, dv = (dqkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    attention_backward(split_heads(dy, n_head), att_cache, dq, dk, dv, ws, name)
    dqkv = dqkv.reshape(b, t, 3 * c)
    if fused_ln:
        return layernorm_linear_backward(dqkv, qkv_cache, d_ln[0], d_ln[1], dw_qkv, db_qkv, ws,
                                         name + ".qkv", accumulate=accumulate)
    # gradients w.r.t. the scaled rows -> w.r.t. the stored ones: one more factor of scale
    dw, db = dw_qkv, db_qkv
    if accumulate:
        dw = ws.get(name + ".qkv.dw", dw_qkv.shape, dw_qkv.dtype)
        db = None if db_qkv is None else ws.get(name + ".qkv.db", db_qkv.shape, db_qkv.dtype)
    dx = linear_backward(dqkv, qkv_cache, dw, db, ws, name + ".qkv", accumulate=False)
    dw *= scale[:, None]
    if db is not None:
        db *= scale
    if accumulate:
        dw_qkv += dw
        if db is not None:
            db_qkv += db
    return dx
