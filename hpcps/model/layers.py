"""Transformer layers as forward/backward function pairs over (..., C) arrays.

Every layer is written once against ``xp`` (NumPy or CuPy, taken from the
arrays) and works in the dtype of its inputs (fp32 for training, fp64 for the
gradient checks). Conventions, as in llm.c:

* ``forward(...) -> out, cache``; ``backward(dout, cache, *grads) -> dinput``.
* Parameter gradients are ACCUMULATED (``+=``) into the given views of the flat
  gradient buffer, so a tensor used twice (tied embedding / LM head) sums both;
  ``accumulate=False`` overwrites instead (single-use tensors: no zeroing pass).
* Outputs and temporaries come from an optional ``Workspace`` under
  ``name``-prefixed keys, so a training step allocates nothing after the first.
  A backward may overwrite its cache in place (it is called once per forward).

Linear weights are stored (out_features, in_features) like ``torch.nn.Linear``.

On CuPy the row reductions and elementwise chains (LayerNorm, GELU, softmax
cross-entropy) run as fused kernels from ``hpcps.gpu.kernels`` and the GEMMs at
``gpu.compute_dtype`` (``matmul``); the NumPy code path is unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hpcps.backend import array_module
from hpcps.gpu import is_cupy, kernels
from hpcps.gpu.precision import matmul as gpu_matmul
from hpcps.model.workspace import Workspace, scratch

GELU_K = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715
ONE_HOT_LIMIT = 1 << 22   # rows x vocab below which a one-hot GEMM beats a scatter on CPU


def matmul(a, b, out=None):
    """``xp.matmul(a, b, out=out)``; on CuPy at gpu.compute_dtype (TF32 / bf16 tensor cores)."""
    xp = array_module(a)
    if is_cupy(xp):
        return gpu_matmul(a, b, out)
    return xp.matmul(a, b, out=out)


def ones(ws: Workspace, n: int, dtype, scale: float = 1.0):
    """A cached vector filled with ``scale``: GEMV against it is the fastest row/column sum."""
    return ws.constant(f"ones.{n}.{np.dtype(dtype).name}.{scale!r}", (n,), dtype,
                       lambda buf: buf.fill(scale))


def column_sum_into(target, rows, ws: Workspace, accumulate: bool = True) -> None:
    """``target (+)= rows.sum(axis=0)`` for a 2-D ``rows`` (as a GEMV)."""
    if accumulate:
        target += ones(ws, rows.shape[0], rows.dtype) @ rows
    else:
        ws.xp.matmul(ones(ws, rows.shape[0], rows.dtype), rows, out=target)


# -- embedding -------------------------------------------------------------------------

def embedding_forward(weight, idx, ws: Optional[Workspace] = None, name: str = "emb"):
    """out[..., :] = weight[idx[...]]; idx is an integer array of any shape."""
    xp = array_module(weight)
    ws = scratch(ws, xp)
    out = ws.get(name + ".out", tuple(idx.shape) + (weight.shape[1],), weight.dtype)
    xp.take(weight, idx, axis=0, out=out)
    return out, idx


def embedding_backward(dout, cache, dweight, ws: Optional[Workspace] = None,
                       name: str = "emb") -> None:
    """dweight[idx] += dout (repeated indices sum). There is no input gradient."""
    idx = cache
    ws = scratch(ws, array_module(dweight))
    scatter_add_rows(dweight, idx.reshape(-1), dout.reshape(-1, dout.shape[-1]), ws, name)


def scatter_add_rows(target, rows, values, ws: Optional[Workspace] = None,
                     name: str = "scatter") -> None:
    """``target[rows[i]] += values[i]`` with repeated rows summed, per backend."""
    xp = array_module(target)
    if xp is not np:
        xp.add.at(target, rows, values)   # CuPy: atomic adds on the device
        return
    ws = scratch(ws, xp)
    n, vocab = rows.shape[0], target.shape[0]
    if n * vocab <= ONE_HOT_LIMIT:
        # small vocabulary: one (V, n) x (n, C) GEMM beats np.add.at by ~10x
        one_hot = ws.get(name + ".onehot", (vocab, n), values.dtype)
        one_hot.fill(0)
        one_hot[rows, np.arange(n)] = 1
        target += one_hot @ values
        return
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    target[sorted_rows[starts]] += np.add.reduceat(values[order], starts, axis=0)


def scatter_add_bytes(rows: int, vocab: int, width: int, itemsize: int = 4,
                      one_hot_kept: bool = False) -> int:
    """Bytes ``scatter_add_rows`` (NumPy) allocates at once for ``rows`` values of ``width``
    into a (vocab, width) target: the one-hot matrix (unless a workspace keeps it,
    ``one_hot_kept``), its column indices and the GEMM's product; or the sort's int64
    indices, the gathered rows and the per-row sums."""
    if rows * vocab <= ONE_HOT_LIMIT:
        one_hot = 0 if one_hot_kept else vocab * rows * itemsize
        return one_hot + 8 * rows + vocab * width * itemsize
    unique = min(rows, vocab)
    return 16 * rows + 8 * unique + (rows + unique) * width * itemsize


# -- layer norm ------------------------------------------------------------------------

def normalize_forward(x, eps: float, ws: Workspace, name: str):
    """(xhat, rstd) of the rows of x (2-D view): xhat = (x - mean) * rstd."""
    xp = ws.xp
    c = x.shape[-1]
    x2 = x.reshape(-1, c)
    dt = x.dtype
    if is_cupy(xp):   # one kernel: mean, variance and xhat per row
        xhat = ws.get(name + ".xhat", x2.shape, dt)
        rstd = ws.get(name + ".rstd", x2.shape[:1], dt)
        kernels.layernorm_forward(xp.ascontiguousarray(x2), eps, xhat, rstd)
        return xhat, rstd
    mean = xp.matmul(x2, ones(ws, c, dt, 1.0 / c))
    xhat = ws.get(name + ".xhat", x2.shape, dt)
    xp.subtract(x2, mean[:, None], out=xhat)
    var = xp.einsum("ij,ij->i", xhat, xhat)
    var *= dt.type(1.0 / c)
    var += dt.type(eps)
    rstd = xp.sqrt(var, out=var)
    xp.reciprocal(rstd, out=rstd)
    xhat *= rstd[:, None]
    return xhat, rstd


def normalize_backward(dxhat, xhat, rstd, ws: Workspace):
    """dx from d(xhat), in place in dxhat: rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))."""
    xp = ws.xp
    if is_cupy(xp):
        kernels.layernorm_backward(dxhat, xhat, rstd, dxhat)
        return dxhat
    c = xhat.shape[1]
    dt = xhat.dtype
    mean_d = xp.matmul(dxhat, ones(ws, c, dt, 1.0 / c))
    mean_dx = xp.einsum("ij,ij->i", dxhat, xhat)
    mean_dx *= dt.type(1.0 / c)
    dxhat -= mean_d[:, None]
    tmp = ws.get("tmp.norm", xhat.shape, dt)
    xp.multiply(xhat, mean_dx[:, None], out=tmp)
    dxhat -= tmp
    dxhat *= rstd[:, None]
    return dxhat


def layernorm_forward(x, weight, bias=None, eps: float = 1e-5,
                      ws: Optional[Workspace] = None, name: str = "ln"):
    xp = array_module(x)
    ws = scratch(ws, xp)
    xhat, rstd = normalize_forward(x, eps, ws, name)
    out = ws.get(name + ".out", xhat.shape, x.dtype)
    xp.multiply(xhat, weight, out=out)
    if bias is not None:
        out += bias
    return out.reshape(x.shape), (xhat, rstd, weight)


def layernorm_backward(dout, cache, dweight, dbias=None, ws: Optional[Workspace] = None,
                       name: str = "ln", accumulate: bool = True):
    """accumulate=False overwrites dweight / dbias instead of adding (single-use tensors)."""
    xhat, rstd, weight = cache
    xp = array_module(xhat)
    ws = scratch(ws, xp)
    d2 = dout.reshape(xhat.shape)
    tmp = ws.get("tmp.norm", xhat.shape, xhat.dtype)
    xp.multiply(d2, xhat, out=tmp)
    column_sum_into(dweight, tmp, ws, accumulate)
    if dbias is not None:
        column_sum_into(dbias, d2, ws, accumulate)
    dxhat = ws.get(name + ".dx", xhat.shape, xhat.dtype)
    xp.multiply(d2, weight, out=dxhat)
    return normalize_backward(dxhat, xhat, rstd, ws).reshape(dout.shape)


def layernorm_linear_forward(x, ln_weight, ln_bias, weight, bias=None, *, out_scale=None,
                             eps: float = 1e-5, out=None, ws: Optional[Workspace] = None,
                             name: str = "lnlin"):
    """linear(layernorm(x)) with the LayerNorm affine folded into the linear weights:

        out = xhat @ (weight * ln_weight).T + (weight @ ln_bias + bias)

    so the normalized rows are the only (N, C) array written and the backward gets
    d(xhat) straight from its GEMM. out_scale (out_features,), optional, multiplies
    the output features (the attention folds 1/sqrt(hs) into its q rows this way).
    out: optional (N, out_features) array for the result (the backward does not need it).
    """
    xp = array_module(x)
    ws = scratch(ws, xp)
    dt = x.dtype
    xhat, rstd = normalize_forward(x, eps, ws, name)
    w_eff = ws.get(name + ".w_eff", weight.shape, dt)
    xp.multiply(weight, ln_weight, out=w_eff)
    b_eff = None
    if ln_bias is not None or bias is not None:
        b_eff = ws.get(name + ".b_eff", weight.shape[:1], dt)
        if ln_bias is not None:
            xp.matmul(weight, ln_bias, out=b_eff)
        else:
            b_eff.fill(0)
        if bias is not None:
            b_eff += bias
    if out_scale is not None:
        w_eff *= out_scale[:, None]
        if b_eff is not None:
            b_eff *= out_scale
    if out is None:
        out = ws.get(name + ".out", (xhat.shape[0], weight.shape[0]), dt)
    matmul(xhat, w_eff.T, out=out)
    if b_eff is not None:
        out += b_eff
    cache = (xhat, rstd, weight, w_eff, ln_weight, ln_bias, out_scale, x.shape)
    return out.reshape(x.shape[:-1] + (weight.shape[0],)), cache


def layernorm_linear_backward(dout, cache, dln_weight, dln_bias, dweight, dbias=None,
                              ws: Optional[Workspace] = None, name: str = "lnlin",
                              accumulate: bool = True):
    """Gradients of the four parameters (accumulated unless accumulate=False) and of x."""
    xhat, rstd, weight, w_eff, ln_weight, ln_bias, out_scale, x_shape = cache
    has_ln_bias = ln_bias is not None
    xp = array_module(xhat)
    ws = scratch(ws, xp)
    dt = xhat.dtype
    d2 = dout.reshape(-1, weight.shape[0])
    m = ws.get(name + ".m", weight.shape, dt)
    matmul(d2.T, xhat, out=m)                         # dout^T xhat, the one big GEMM here
    col = None
    if has_ln_bias or dbias is not None:
        col = ones(ws, d2.shape[0], dt) @ d2          # column sums of dout
    if out_scale is not None:                         # back to the unscaled output features
        m *= out_scale[:, None]
        if col is not None:
            col *= out_scale
    dw = ws.get(name + ".dw", weight.shape, dt) if accumulate else dweight
    xp.multiply(m, ln_weight, out=dw)
    if has_ln_bias:
        dw += xp.outer(col, ln_bias)
    if accumulate:
        dweight += dw
    if dbias is not None:
        _store(dbias, col, accumulate)
    _store(dln_weight, xp.einsum("oc,oc->c", weight, m), accumulate)
    if has_ln_bias:
        _store(dln_bias, col @ weight, accumulate)
    dxhat = ws.get(name + ".dx", xhat.shape, dt)
    matmul(d2, w_eff, out=dxhat)
    return normalize_backward(dxhat, xhat, rstd, ws).reshape(x_shape)


def _store(target, value, accumulate: bool) -> None:
    if accumulate:
        target += value
    else:
        target[...] = value


# -- linear ----------------------------------------------------------------------------

def linear_forward(x, weight, bias=None, ws: Optional[Workspace] = None, name: str = "linear",
                   out=None):
    """out = x @ weight.T + bias with weight (out_features, in_features).

    out: optional (N, out_features) array for the result (the backward does not need it).
    """
    xp = array_module(x)
    ws = scratch(ws, xp)
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = ws.get(name + ".out", (x2.shape[0], weight.shape[0]), x.dtype)
    matmul(x2, weight.T, out=out)
    if bias is not None:
        out += bias
    return out.reshape(x.shape[:-1] + (weight.shape[0],)), (x2, weight, x.shape)


def linear_backward(dout, cache, dweight, dbias=None, ws: Optional[Workspace] = None,
                    name: str = "linear", need_dx: bool = True, accumulate: bool = True):
    """accumulate=False overwrites dweight / dbias instead of adding (single-use tensors)."""
    x2, weight, x_shape = cache
    xp = array_module(x2)
    ws = scratch(ws, xp)
    d2 = dout.reshape(-1, weight.shape[0])
    if accumulate:
        dw = ws.get(name + ".dw", weight.shape, weight.dtype)
        matmul(d2.T, x2, out=dw)
        dweight += dw
    else:
        matmul(d2.T, x2, out=dweight)
    if dbias is not None:
        column_sum_into(dbias, d2, ws, accumulate)
    if not need_dx:
        return None
    dx = ws.get(name + ".dx", x2.shape, x2.dtype)
    matmul(d2, weight, out=dx)
    return dx.reshape(x_shape)


# -- GELU (tanh approximation, as GPT-2) -----------------------------------------------

def gelu_forward(x, ws: Optional[Workspace] = None, name: str = "gelu"):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), torch's GELU(approximate='tanh').

    The derivative is computed here, while x and its temporaries are hot in
    cache, and cached instead of x: the backward is a single multiply and the
    input buffer is free for reuse as soon as this returns.
    """
    xp = array_module(x)
    ws = scratch(ws, xp)
    dt = x.dtype
    if is_cupy(xp):   # value and derivative in one elementwise kernel
        out, grad = ws.get(name + ".out", x.shape, dt), ws.get(name + ".grad", x.shape, dt)
        kernels.gelu_forward(x, out, grad)
        return out, grad
    q = ws.get("tmp.gelu.q", x.shape, dt)
    h = ws.get("tmp.gelu.h", x.shape, dt)
    xp.multiply(x, x, out=q)
    q *= dt.type(GELU_A * GELU_K)
    q += dt.type(GELU_K)                        # q = k (1 + a x^2), so tanh's argument is q x
    xp.multiply(q, x, out=h)
    xp.tanh(h, out=h)
    h *= dt.type(0.5)
    h += dt.type(0.5)                           # h = (1 + tanh(q x)) / 2
    out = ws.get(name + ".out", x.shape, dt)
    xp.multiply(x, h, out=out)
    grad = ws.get(name + ".grad", x.shape, dt)
    _gelu_derivative(x, q, h, out, grad)
    return out, grad


def _gelu_derivative(x, q, h, y, grad) -> None:
    """grad = h (1 + (x - y) (6 q - 4 k)), i.e. h (1 + 2 k x (1 - h) (1 + 3 a x^2)) with
    y = x h and q = k (1 + a x^2); q is overwritten."""
    xp = array_module(x)
    dt = x.dtype
    q *= dt.type(6.0)
    q -= dt.type(4.0 * GELU_K)                  # 2 k (1 + 3 a x^2)
    xp.subtract(x, y, out=grad)                 # x (1 - h)
    grad *= q
    grad += dt.type(1.0)
    grad *= h


def gelu_backward(dout, cache, ws: Optional[Workspace] = None, name: str = "gelu"):
    """dout * gelu'(x); the derivative was cached by the forward."""
    xp = array_module(dout)
    ws = scratch(ws, xp)
    dx = ws.get(name + ".dx", dout.shape, dout.dtype)
    xp.multiply(dout, cache, out=dx)
    return dx


# -- softmax cross-entropy -------------------------------------------------------------

def cross_entropy_forward(logits, targets, ignore_index: int = -1,
                          ws: Optional[Workspace] = None, name: str = "xent",
                          in_place: bool = False):
    """Mean over non-ignored targets of -log softmax(logits)[target] -> (loss array, cache).

    in_place (NumPy): the probabilities (and then the backward's gradient) overwrite the
    logits, which saves a (rows, vocab) array, the largest activation of a language model."""
    xp = array_module(logits)
    ws = scratch(ws, xp)
    v = logits.shape[-1]
    l2 = logits.reshape(-1, v)
    t = targets.reshape(-1)
    n, dt = l2.shape[0], logits.dtype
    if is_cupy(xp):
        return _cross_entropy_forward_fused(xp, l2, t, ignore_index, ws, name)
    valid = t != ignore_index
    safe_t = xp.where(valid, t, 0)
    rows = xp.arange(n)
    picked = l2[rows, safe_t]                         # read before in_place overwrites them
    probs = l2 if in_place else ws.get(name + ".probs", (n, v), dt)
    row_max = l2.max(axis=1, keepdims=True)
    xp.subtract(l2, row_max, out=probs)
    xp.exp(probs, out=probs)
    total = xp.matmul(probs, ones(ws, v, dt))
    count = xp.maximum(valid.sum(), 1).astype(dt)
    # -log p[target] = log(sum exp(l - max)) - (l[target] - max)
    nll = xp.log(total) - (picked - row_max[:, 0])
    loss = (nll * valid).sum() / count
    probs /= total[:, None]
    return loss, (probs, safe_t, valid, count)


class _FusedXentCache(tuple):
    """(probs, targets, ignore_index, count) of the fused CuPy cross-entropy."""


def _cross_entropy_forward_fused(xp, l2, t, ignore_index: int, ws: Workspace, name: str):
    """One kernel writes the probabilities and each row's -log p[target]; the loss stays a
    device scalar (no synchronisation here)."""
    n, v = l2.shape
    dt = l2.dtype
    probs = ws.get(name + ".probs", (n, v), dt)
    nll = ws.get(name + ".nll", (n,), dt)
    t = xp.ascontiguousarray(t if t.dtype.name in ("int64", "int32") else t.astype(xp.int64))
    kernels.cross_entropy_forward(xp.ascontiguousarray(l2), t, ignore_index, probs, nll)
    count = xp.maximum((t != ignore_index).sum(), 1).astype(dt)
    return nll.sum() / count, _FusedXentCache((probs, t, ignore_index, count))


def cross_entropy_backward(cache, dloss: float = 1.0):
    """d loss / d logits (2-D, rows x vocab), computed in the cached probabilities."""
    if isinstance(cache, _FusedXentCache):
        probs, t, ignore_index, count = cache
        scale = array_module(probs).divide(float(dloss), count).astype(probs.dtype).reshape(1)
        kernels.cross_entropy_backward(probs, t, ignore_index, scale)
        return probs
    probs, safe_t, valid, count = cache
    xp = array_module(probs)
    probs[xp.arange(probs.shape[0]), safe_t] -= 1
    scale = (valid.astype(probs.dtype) * (probs.dtype.type(dloss) / count))
    probs *= scale[:, None]
    return probs


# -- residual and dropout --------------------------------------------------------------

def residual_forward(x, branch, inplace: bool = False):
    """x + branch (into x when ``inplace``)."""
    if inplace:
        x += branch
        return x
    return x + branch


def residual_backward(dout):
    """Both the skip path and the branch receive dout unchanged."""
    return dout, dout


_GOLDEN = 0x9E3779B97F4A7C15
_SITE_MUL = 0xC2B2AE3D27D4EB4F


def _mix64(xp, z):
    """splitmix64 finalizer on a uint64 array (wrapping arithmetic, same on NumPy and CuPy)."""
    z ^= z >> xp.uint64(30)
    z *= xp.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> xp.uint64(27)
    z *= xp.uint64(0x94D049BB133111EB)
    z ^= z >> xp.uint64(31)
    return z


def dropout_mask(xp, keys, site: int, shape: tuple, p: float, dtype):
    """(len(keys),) + shape mask of 0 and 1/(1-p) from a counter-based hash.

    Row b depends only on (keys[b], site, element index), never on the batch size
    or the row's position, so splitting a batch across workers gives the same masks.
    """
    n = int(np.prod(shape, dtype=np.int64))
    k = xp.asarray(np.asarray(keys, dtype=np.int64).astype(np.uint64))
    seed = _mix64(xp, k * xp.uint64(_GOLDEN) + xp.uint64((site * _SITE_MUL) % (1 << 64)))
    z = seed[:, None] + xp.arange(n, dtype=xp.uint64)[None, :] * xp.uint64(_GOLDEN)
    z = _mix64(xp, z)
    keep = (z >> xp.uint64(40)) >= xp.uint64(int(p * (1 << 24)))
    dt = np.dtype(dtype)
    mask = keep.astype(dt)
    mask *= dt.type(1.0 / (1.0 - p))
    return mask.reshape((len(keys),) + tuple(shape))
