"""BERT-style masked language model on the flat parameter buffer, hand-written backward.

token + learned position embedding -> n_layer pre-LayerNorm encoder blocks
(bidirectional self-attention, 4x GELU MLP) -> final LayerNorm -> MLM head:
dense (C -> C) + GELU + LayerNorm + decoder tied to the token embedding + output
bias -> cross-entropy, mean over the predicted positions.

Pre-LN (as GPT-2) rather than BERT's post-LN: it trains stably without a long
warm-up, and the final LayerNorm takes the place of post-LN's last one. No
segment embeddings and no next-sentence task (as RoBERTa). The head runs only on
the predicted rows (about 15% of the positions), gathered before the final
LayerNorm, which is row-wise; its decoder and cross-entropy run a block of rows at
a time, as GPT's LM head (``hpcps.model.lm_head``).

``targets`` (B, T) hold the original token at predicted positions and -1
elsewhere; ``vocab_size`` is the model's vocabulary, [MASK] included (the
workload uses corpus vocab + 1).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from hpcps.backend import CPU, Backend, array_module
from hpcps.errors import UserError
from hpcps.model.checks import check_dropout_keys, check_flat_buffer
from hpcps.model.encdec import (
    INIT_STD,
    Dropout,
    add_encoder_block,
    add_linear,
    add_norm,
    block_range,
    encoder_block_backward,
    encoder_block_forward,
)
from hpcps.model.layers import (
    embedding_backward,
    gelu_backward,
    gelu_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
)
from hpcps.model.layout import GradReady, ParamLayout, grad_ready_notifier
from hpcps.model.lm_head import head_eval, head_logits, head_loss
from hpcps.model.memory_encdec import BertShape, bert_bytes
from hpcps.model.recompute import BlockActivations, check_recompute
from hpcps.model.workspace import Workspace, scratch

_MAX_WORKSPACES = 4


def build_layout(*, vocab_size: int, n_layer: int, n_embd: int, block_size: int,
                 bias: bool) -> ParamLayout:
    """wte, wpe, blocks h0..h{L-1}, lnf, MLM head: the backward finishes ranges from the
    end of the buffer towards its start."""
    c = n_embd
    lay = ParamLayout()
    lay.add("wte", (vocab_size, c), std=INIT_STD)
    lay.add("wpe", (block_size, c), std=INIT_STD)
    for i in range(n_layer):
        add_encoder_block(lay, f"h{i}.", c, bias, INIT_STD / math.sqrt(2 * n_layer))
    add_norm(lay, "lnf", c, bias)
    add_linear(lay, "mlm.dense", c, c, INIT_STD, bias)
    add_norm(lay, "mlm.ln", c, bias)
    lay.add("mlm.bias", (vocab_size,))
    return lay


def check_shape_args(**values) -> None:
    for key, val in values.items():
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or val < 1:
            raise UserError(f"{key} must be a positive integer, got {val!r}")


def _mlm_hidden(x, P: dict, ws: Workspace):
    """GELU(LN_f(x) W_dense + b) of rows x (M, C), the encoder's final LayerNorm ``lnf``
    fused into the dense layer; (hidden, dense cache, GELU cache)."""
    hid, dense = layernorm_linear_forward(x, P["lnf.w"], P.get("lnf.b"), P["mlm.dense.w"],
                                          P.get("mlm.dense.b"), ws=ws, name="mlm.dense")
    g, gelu = gelu_forward(hid, ws, "mlm.gelu")
    return g, dense, gelu


def mlm_head_loss(x, P: dict, targets, ws: Workspace, G: Optional[dict] = None):
    """Mean cross-entropy of the MLM head over rows x (M, C) with targets (M,) -> (loss, dx).

    The decoder (``mlm.ln``, the tied ``wte``, ``mlm.bias``) runs a block of rows at a time
    (``hpcps.model.lm_head``): a (rows, V) block of logits instead of all M x V, and no
    LayerNorm-folded V x C copy of ``wte``. With G the head tensors and lnf are
    overwritten, and so is the tied ``wte`` gradient (the embedding lookup's backward adds
    to it afterwards); dx is d(loss)/dx (else None).
    """
    g, dense, gelu = _mlm_hidden(x, P, ws)
    grads = None if G is None else (G["mlm.ln.w"], G.get("mlm.ln.b"), G["wte"], G["mlm.bias"])
    loss, dg = head_loss(g, P["mlm.ln.w"], P.get("mlm.ln.b"), P["wte"], targets, ws, grads,
                         bias=P["mlm.bias"])
    if G is None:
        return loss, None
    dh = gelu_backward(dg, gelu, ws, "bwd.mlm.gelu")
    return loss, layernorm_linear_backward(dh, dense, G["lnf.w"], G.get("lnf.b"),
                                           G["mlm.dense.w"], G.get("mlm.dense.b"), ws,
                                           "bwd.mlm.dense", accumulate=False)


def mlm_head_eval(x, P: dict, targets, ws: Workspace) -> tuple[float, int]:
    """(mean cross-entropy, rows whose largest logit is the target) of rows x (M, C)."""
    g, _, _ = _mlm_hidden(x, P, ws)
    return head_eval(g, P["mlm.ln.w"], P.get("mlm.ln.b"), P["wte"], targets, ws,
                     bias=P["mlm.bias"])


def mlm_head_forward(x, P: dict, ws: Optional[Workspace] = None):
    """logits (M, V) = LN_mlm(GELU(LN_f(x) W_dense + b)) wte^T + mlm.bias for rows x (M, C),
    all at once (inference on a few rows; training runs ``mlm_head_loss``)."""
    ws = scratch(ws, array_module(x))
    g, _, _ = _mlm_hidden(x, P, ws)
    return head_logits(g, P["mlm.ln.w"], P.get("mlm.ln.b"), P["wte"], ws, bias=P["mlm.bias"])


class BertMLM:
    def __init__(self, *, vocab_size: int, n_layer: int, n_head: int, n_embd: int,
                 block_size: int, bias: bool = False, dropout: float = 0.0,
                 backend: Backend = CPU, recompute: str = "none") -> None:
        """recompute: what the forward keeps for the backward (``hpcps.model.recompute``)."""
        check_shape_args(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         block_size=block_size)
        if n_embd % n_head:
            raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.n_layer, self.n_head = int(vocab_size), int(n_layer), int(n_head)
        self.n_embd, self.block_size = int(n_embd), int(block_size)
        self.bias, self.dropout = bool(bias), float(dropout)
        self.backend, self.xp = backend, backend.xp
        self.recompute = check_recompute(recompute)
        self.layout = build_layout(vocab_size=self.vocab_size, n_layer=self.n_layer,
                                   n_embd=self.n_embd, block_size=self.block_size, bias=self.bias)
        self._ready_ranges = self._grad_ready_ranges()
        self._workspaces: dict = {}

    # -- public API --------------------------------------------------------------------

    def init_params(self, seed: int):
        return self.backend.asarray(self.layout.init_slice(seed))

    def forward_backward(self, params, grads, idx, targets,
                         dropout_keys: Optional[Sequence[int]] = None,
                         on_grad_ready: Optional[GradReady] = None) -> float:
        """Overwrite grads with d(mean loss over predicted positions)/d(params)."""
        idx, targets = self._check_batch(idx, targets)
        self._check_buffer(params, "params")
        self._check_buffer(grads, "grads")
        keys = self._check_keys(dropout_keys, idx.shape[0])
        ws = self._workspace(idx.shape, params.dtype)
        P, G = self.layout.views(params), self.layout.views(grads)
        picked, t_sel, caches = self._forward(P, idx, targets, keys, ws)
        loss, dpicked = mlm_head_loss(picked, P, t_sel, ws, G)
        self._backward(G, dpicked, caches, ws,
                       grad_ready_notifier(self._ready_ranges, on_grad_ready))
        return float(loss)

    def eval_stats(self, params, idx, targets) -> tuple[float, int, int]:
        """(sum of the NLL, correct argmax predictions, predicted positions) of a batch."""
        idx, targets = self._check_batch(idx, targets)
        self._check_buffer(params, "params")
        ws = self._workspace(idx.shape, params.dtype)
        picked, t_sel, _ = self._forward(self.layout.views(params), idx, targets, None, ws)
        loss, correct = mlm_head_eval(picked, self.layout.views(params), t_sel, ws)
        n = int(t_sel.shape[0])
        return float(loss) * n, correct, n

    def logits(self, params, idx, targets):
        """(M, vocab) logits at the predicted positions (row-major order of targets != -1)."""
        idx, targets = self._check_batch(idx, targets)
        ws = Workspace(self.xp, reuse=False)
        P = self.layout.views(params)
        picked, _, _ = self._forward(P, idx, targets, None, ws)
        return mlm_head_forward(picked, P, ws).copy()

    def memory_bytes(self, batch: int, predicted: int, recompute: Optional[str] = None) -> dict:
        """{term: bytes} a training step over ``batch`` sequences of block_size tokens,
        ``predicted`` of each at the head, holds beyond the params and grads buffers, with
        this model's recomputation or the one given (``hpcps.model.memory_encdec``)."""
        shape = BertShape(self.n_layer, self.n_head, self.n_embd, self.vocab_size, self.bias,
                          self.dropout)
        return bert_bytes(shape, batch, self.block_size, batch * predicted,
                          recompute or self.recompute)

    def flops_per_token(self) -> float:
        """6 x (block and head matmul parameters) + attention; the head runs on ~mask_prob of
        the tokens but is counted in full (an upper bound)."""
        n = self.layout.total - self.layout["wpe"].size
        return 6.0 * n + 12.0 * self.n_layer * self.n_embd * self.block_size

    # -- checks and caches -------------------------------------------------------------

    def _check_batch(self, idx, targets):
        xp = self.xp
        idx, targets = xp.asarray(idx), xp.asarray(targets)
        if idx.ndim != 2 or idx.dtype.kind not in "iu" or idx.shape[0] < 1:
            raise UserError(f"idx must be a non-empty (B, T) integer array, got shape {idx.shape} "
                            f"{idx.dtype}")
        if not 1 <= idx.shape[1] <= self.block_size:
            raise UserError(f"sequence length {idx.shape[1]} is outside 1..block_size "
                            f"({self.block_size})")
        if targets.shape != idx.shape or targets.dtype.kind not in "iu":
            raise UserError(f"targets must be an integer array shaped like idx {idx.shape}, "
                            f"got {targets.shape} {targets.dtype}")
        if xp is np:
            if idx.min() < 0 or idx.max() >= self.vocab_size:
                raise UserError(f"token ids must be in 0..{self.vocab_size - 1}, got "
                                f"{int(idx.min())}..{int(idx.max())}")
            if targets.min() < -1 or targets.max() >= self.vocab_size:
                raise UserError(f"targets must be in 0..{self.vocab_size - 1} or -1 "
                                "(not predicted)")
            if not (targets != -1).any():
                raise UserError("targets select no position to predict")
        return idx, targets

    def _check_buffer(self, buf, what: str) -> None:
        check_flat_buffer(buf, self.layout.total, what)

    def _check_keys(self, keys, batch: int):
        return check_dropout_keys(keys, batch, self.dropout, "sequence")

    def _workspace(self, shape, dtype) -> Workspace:
        key = (tuple(shape), np.dtype(dtype).str)
        if key not in self._workspaces:
            if len(self._workspaces) >= _MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
            self._workspaces[key] = Workspace(self.xp)
        return self._workspaces[key]

    def _grad_ready_ranges(self) -> list:
        """[lo, hi) in the order the backward finishes them: lnf + head, blocks L-1..0,
        embeddings (the tied wte last)."""
        lay = self.layout
        ranges = [(lay["lnf.w"].offset, lay.total)]
        ranges += [block_range(lay, f"h{i}.") for i in reversed(range(self.n_layer))]
        ranges.append((0, lay["wpe"].end))
        return ranges

    # -- forward / backward ------------------------------------------------------------

    def _forward(self, P: dict, idx, targets, keys, ws: Workspace):
        xp = self.xp
        b, t = idx.shape
        c, h = self.n_embd, self.n_head
        dt = P["wte"].dtype
        drop = Dropout(xp, keys, self.dropout, dt)
        x = ws.get("x", (b, t, c), dt)        # the residual stream, updated in place
        xp.take(P["wte"], idx, axis=0, out=x)
        x += P["wpe"][:t]
        emb_mask = drop.mask(0, (t, c))
        if emb_mask is not None:
            x *= emb_mask
        blocks = BlockActivations(self.recompute, ws)
        for i in range(self.n_layer):
            blocks.forward(i, x, lambda xi, names, i=i: encoder_block_forward(
                xi, P, f"h{i}.", h, drop=drop, site=1 + 3 * i, ws=ws, names=names,
                keep_probs=blocks.keep_probs))
        rows = xp.flatnonzero(targets.reshape(-1) != -1)
        picked = x.reshape(-1, c)[rows]       # LayerNorm is row-wise: gather first
        t_sel = targets.reshape(-1)[rows]
        return picked, t_sel, (idx, rows, emb_mask, blocks)

    def _backward(self, G: dict, dpicked, caches, ws: Workspace, notify) -> None:
        """dpicked: the gradient of the head's input rows (the predicted positions)."""
        idx, rows, emb_mask, blocks = caches
        xp = self.xp
        b, t = idx.shape
        c = self.n_embd
        dx = ws.get("bwd.resid", (b * t, c), dpicked.dtype)
        dx.fill(0)
        dx[rows] = dpicked                    # rows are distinct: a plain scatter
        dx = dx.reshape(b, t, c)
        notify(0)
        for i in reversed(range(self.n_layer)):
            encoder_block_backward(dx, blocks.cache(i), G, f"h{i}.", ws=ws)
            notify(self.n_layer - i)
        if emb_mask is not None:
            dx *= emb_mask
        xp.sum(dx, axis=0, out=G["wpe"][:t])
        G["wpe"][t:] = 0
        embedding_backward(dx, idx, G["wte"], ws, "bwd.emb")
        notify(self.n_layer + 1)
