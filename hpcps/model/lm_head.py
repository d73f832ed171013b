"""The language-model head and its cross-entropy, a block of rows at a time.

Logits are (tokens, vocab): at GPT-2's 50257 words and 4 x 1024 tokens that is 0.8 GB in
fp32, more than all the activations a recomputing model keeps. Here the final LayerNorm
runs once over all rows, then each block of rows gets its logits, softmax, loss and, for
training, its share of the head's weight gradient and of d(LayerNorm output), before the
next block reuses the same logits buffer. Peak: one (rows, vocab) block and one weight-
sized gradient buffer instead of the whole logits. GPT's head (tied or not) and BERT's
MLM decoder (tied, with an output bias) both run here.
"""

from __future__ import annotations

from typing import Optional

from hpcps.model.layers import (
    column_sum_into,
    cross_entropy_backward,
    cross_entropy_forward,
    layernorm_backward,
    layernorm_forward,
    matmul,
)
from hpcps.model.workspace import Workspace

CHUNK_BYTES = 64 << 20    # a block's logits stay about this size


def rows_per_chunk(rows: int, vocab: int, itemsize: int) -> int:
    return max(1, min(rows, CHUNK_BYTES // (vocab * itemsize)))


def head_loss(x, ln_w, ln_b, weight, targets, ws: Workspace, grads: Optional[tuple] = None,
              dloss: float = 1.0, bias=None):
    """Mean cross-entropy of softmax(LN(x) weight^T [+ bias]) over targets != -1 -> (loss, dx).

    grads: (d_ln_w, d_ln_b or None, d_weight[, d_bias]) to overwrite with the head's
    gradients of ``dloss`` x the loss (d_bias when there is a ``bias``); dx is then
    d(loss)/dx shaped like x (else None)."""
    t = targets.reshape(-1)
    y, ln_cache = _normalized(x, ln_w, ln_b, ws)
    n, c = y.shape
    total = max(int((t != -1).sum()), 1)
    dy = ws.get("bwd.head.dy", (n, c), y.dtype) if grads is not None else None
    loss = 0.0
    for lo, hi, logits in _logit_blocks(y, weight, bias, ws):
        part, cache = cross_entropy_forward(logits, t[lo:hi], ws=ws, name="head.xent",
                                            in_place=True)
        count = int((t[lo:hi] != -1).sum())
        loss += float(part) * count
        if grads is not None:
            d = cross_entropy_backward(cache, dloss * count / total)
            _weight_grad(d, y[lo:hi], grads[2], lo == 0, ws)
            if bias is not None:
                column_sum_into(grads[3], d, ws, accumulate=lo > 0)
            matmul(d, weight, out=dy[lo:hi])
    loss /= total
    if grads is None:
        return loss, None
    dx = layernorm_backward(dy, ln_cache, grads[0], grads[1], ws, "bwd.head.ln",
                            accumulate=False)
    return loss, dx.reshape(x.shape)


def head_eval(x, ln_w, ln_b, weight, targets, ws: Workspace, bias=None) -> tuple[float, int]:
    """(mean cross-entropy as ``head_loss``, rows whose largest logit is their target)."""
    t = targets.reshape(-1)
    y, _ = _normalized(x, ln_w, ln_b, ws)
    total = max(int((t != -1).sum()), 1)
    loss, correct = 0.0, 0
    for lo, hi, logits in _logit_blocks(y, weight, bias, ws):
        # the argmax before the softmax overwrites the logits with probabilities
        correct += int((logits.argmax(axis=1) == t[lo:hi]).sum())
        part, _ = cross_entropy_forward(logits, t[lo:hi], ws=ws, name="head.xent",
                                        in_place=True)
        loss += float(part) * int((t[lo:hi] != -1).sum())
    return loss / total, correct


def head_logits(x, ln_w, ln_b, weight, ws: Workspace, bias=None):
    """All (rows, vocab) logits at once, as the blocks compute them (inference on few rows)."""
    y, _ = _normalized(x, ln_w, ln_b, ws)
    logits = matmul(y, weight.T)
    if bias is not None:
        logits += bias
    return logits


def _normalized(x, ln_w, ln_b, ws: Workspace):
    """LN(x) over rows (rows, C) and its cache: run once, read by every block."""
    return layernorm_forward(x.reshape(-1, x.shape[-1]), ln_w, ln_b, ws=ws, name="head.ln")


def _logit_blocks(y, weight, bias, ws: Workspace):
    """(lo, hi, logits of rows lo..hi) for each block, all in one reused buffer."""
    n, v = y.shape[0], weight.shape[0]
    step = rows_per_chunk(n, v, y.dtype.itemsize)
    logits_buf = ws.get("head.logits", (step, v), y.dtype)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        logits = logits_buf[:hi - lo]
        matmul(y[lo:hi], weight.T, out=logits)
        if bias is not None:
            logits += bias
        yield lo, hi, logits


def _weight_grad(d, y, dweight, first: bool, ws: Workspace) -> None:
    """dweight (+)= d^T y: the first block writes it, the others add."""
    if first:
        matmul(d.T, y, out=dweight)
        return
    tmp = ws.get("bwd.head.dw", dweight.shape, dweight.dtype)
    matmul(d.T, y, out=tmp)
    dweight += tmp
