"""Skip-gram with negative sampling (word2vec) on the flat parameter buffer.

Two tables, ``emb_in`` (center vectors u) and ``emb_out`` (context vectors v),
both V x d with ``sparse_rows``: a batch's gradient touches only the rows of its
centers, contexts and negatives, so the parameter server is pushed those rows only.
For a pair (c, o) with negatives n_1..n_k the loss is

    -log sigmoid(u_c . v_o) - sum_j log sigmoid(-u_c . v_{n_j})

and a batch's loss is the mean over its pairs. As in word2vec, ``emb_out`` starts
at zero, so every pair's loss at initialisation is exactly (k + 1) log 2.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from hpcps.backend import CPU, Backend, array_module
from hpcps.errors import UserError
from hpcps.model.layers import scatter_add_bytes, scatter_add_rows
from hpcps.model.layout import ParamLayout


def build_layout(vocab_size: int, dim: int) -> ParamLayout:
    """emb_in ~ N(0, 1/d) (word2vec's uniform(-0.5/d, 0.5/d) learns too slowly with Adam's
    per-element steps), emb_out = 0; no weight decay (it would shrink untouched rows)."""
    lay = ParamLayout()
    lay.add("emb_in", (vocab_size, dim), std=1.0 / math.sqrt(dim), decay=False, sparse_rows=True)
    lay.add("emb_out", (vocab_size, dim), value=0.0, decay=False, sparse_rows=True)
    return lay


def log_sigmoid(x):
    """log sigmoid(x) = -softplus(-x), stable for any sign."""
    xp = array_module(x)
    return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))


def sigmoid(x):
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


# -- the negative-sampling layer ---------------------------------------------------------

def sgns_forward(u, v):
    """Mean negative-sampling loss of B pairs.

    u: (B, d) center vectors; v: (B, 1 + k, d) with the context at [:, 0] and the k
    negatives after it. Returns (loss as a 0-d array, cache).
    """
    xp = array_module(u)
    scores = xp.einsum("bd,bjd->bj", u, v)
    scores[:, 1:] *= -1                      # negatives enter as sigmoid(-score)
    loss = -log_sigmoid(scores).sum() / u.shape[0]
    return loss, (u, v, scores)


def sgns_backward(cache, dloss: float = 1.0):
    """(du, dv) of ``dloss * loss``: d(-log sigmoid(s))/ds = -sigmoid(-s)."""
    u, v, scores = cache
    xp = array_module(u)
    ds = sigmoid(-scores)
    ds *= u.dtype.type(-dloss / u.shape[0])
    ds[:, 1:] *= -1                          # chain rule through the sign flip
    du = xp.einsum("bj,bjd->bd", ds, v)
    dv = ds[:, :, None] * u[:, None, :]
    return du, dv


# -- the model ----------------------------------------------------------------------------

class SkipGram:
    def __init__(self, vocab_size: int, dim: int, backend: Backend = CPU):
        for key, val in (("vocab_size", vocab_size), ("dim", dim)):
            if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
                raise UserError(f"skip-gram {key} must be a positive integer, got {val!r}")
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.backend = backend
        self.layout = build_layout(self.vocab_size, self.dim)

    def _tables(self, flat):
        views = self.layout.views(flat)
        return views["emb_in"], views["emb_out"]

    def _gather(self, params, centers, targets):
        emb_in, emb_out = self._tables(params)
        xp = array_module(params)
        return xp.take(emb_in, centers, axis=0), xp.take(emb_out, targets, axis=0)

    def _check(self, centers, targets):
        if centers.ndim != 1 or targets.ndim != 2 or targets.shape[0] != centers.shape[0]:
            raise UserError(f"skip-gram batch needs centers (B,) and targets (B, 1+k), got "
                            f"{tuple(centers.shape)} and {tuple(targets.shape)}")
        if targets.shape[1] < 2:
            raise UserError("skip-gram targets need the context and at least one negative")

    def forward_backward(self, params, grads, centers, targets) -> float:
        """Overwrite ``grads`` with d(mean loss)/d(params); return the mean loss.
        centers (B,) and targets (B, 1 + k) are integer arrays on the params' device."""
        self._check(centers, targets)
        u, v = self._gather(params, centers, targets)
        loss, cache = sgns_forward(u, v)
        du, dv = sgns_backward(cache)
        grads.fill(0)
        g_in, g_out = self._tables(grads)
        scatter_add_rows(g_in, centers, du, name="sg.in")
        scatter_add_rows(g_out, targets.reshape(-1), dv.reshape(-1, self.dim), name="sg.out")
        return float(loss)

    def loss(self, params, centers, targets) -> float:
        self._check(centers, targets)
        u, v = self._gather(params, centers, targets)
        return float(sgns_forward(u, v)[0])

    def pair_stats(self, params, centers, targets) -> tuple[float, float]:
        """(summed loss, pairs whose context outscores every negative) of a batch."""
        self._check(centers, targets)
        u, v = self._gather(params, centers, targets)
        loss, (_, _, scores) = sgns_forward(u, v)
        hits = (scores[:, 0] > (-scores[:, 1:]).max(axis=1)).sum()
        return float(loss) * len(centers), float(hits)

    def flops_per_pair(self, negatives: int) -> float:
        # forward scores + du + dv: three (1 + k) x d multiply-adds per pair
        return 6.0 * self.dim * (1 + negatives)

    def memory_bytes(self, batch: int, negatives: int, eval_batch: int = 0,
                     item: int = 4) -> dict:
        """{activations, logits, scratch} at the peak of a training step over ``batch``
        pairs with ``negatives`` negatives each, or of an evaluation forward over
        ``eval_batch`` pairs when that is larger. Nothing outlives a step: the peak is the
        gathered rows (u, v), their scores and gradients (du, dv) and the larger of the two
        scatters into the tables' gradients (``layers.scatter_add_rows``)."""
        train = self._step_bytes(batch, 1 + negatives, item, backward=True)
        if not eval_batch:
            return train
        evaluation = self._step_bytes(eval_batch, 1 + negatives, item, backward=False)
        return max(train, evaluation, key=lambda terms: sum(terms.values()))

    def _step_bytes(self, b: int, targets: int, item: int, backward: bool) -> dict:
        d, v = self.dim, self.vocab_size
        rows = (b + b * targets) * d * item                  # u (B, d), v (B, 1 + k, d)
        scores = b * targets * item
        inputs = 8 * b * (1 + targets)                       # centers, targets (int64)
        if not backward:                                     # log-sigmoid's temporaries
            return {"activations": rows, "logits": scores, "scratch": 4 * scores + inputs}
        scatter = max(scatter_add_bytes(b, v, d, item),
                      scatter_add_bytes(b * targets, v, d, item))
        return {"activations": 2 * rows, "logits": scores, "scratch": scatter + inputs}


def cosine_neighbours(vectors: np.ndarray, query: int, top: int,
                      allowed: Optional[np.ndarray] = None) -> list[tuple[int, float]]:
    """The ``top`` rows most cosine-similar to row ``query`` (itself excluded);
    ``allowed``: boolean mask of candidate rows."""
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0
    sims = vectors @ vectors[query] / (norms * norms[query])
    sims[query] = -np.inf
    if allowed is not None:
        sims[~allowed] = -np.inf
    order = np.argsort(-sims, kind="stable")[:top]
    return [(int(i), float(sims[i])) for i in order if np.isfinite(sims[i])]
