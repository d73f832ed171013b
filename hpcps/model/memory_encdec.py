"""Bytes a training step of BERT (``hpcps.model.bert``) and of the T5-style encoder-decoder
(``hpcps.model.seq2seq``) holds beyond the flat params / grads buffers, from their shapes,
before anything is allocated (the start-up memory check and ``hpcps plan``).

Both run the blocks of ``hpcps.model.encdec`` on a ``Workspace``, so the count walks a
step in the models' order and names every buffer they ask the workspace for, each at the
largest size it is asked for: the encoder and the decoder share scratch names at their
own lengths, and a name asked for at a new size is replaced. That is what the workspace
holds of each name at its fullest, buffer for buffer (tests/test_memory_workloads.py),
and, where no name changes size (seq2seq with one length and one vocabulary), the
workspace after the step. Where one does, the sum is an upper bound: BERT's head, for
one, runs its GELU in the blocks' scratch at its few rows before the backward.

On top come the arrays a forward keeps outside the workspace (LayerNorm rstd vectors, the
key padding mask, dropout masks drawn at the longest lengths) and the largest temporary
of the step (a dropout mask's hash words, the head's folded-bias gradient, the embedding
backward's scatter). An evaluation at the training shapes reuses the training buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcps.model.attention import head_chunk
from hpcps.model.layers import ONE_HOT_LIMIT, scatter_add_bytes
from hpcps.model.lm_head import rows_per_chunk

ACT, LOGITS, SCRATCH = "activations", "logits", "scratch"
MASK_HASH_BYTES = 17     # per mask element while it is drawn: uint64 words, a shifted copy, bools


class Buffers:
    """Named workspace buffers (bytes), the term each counts under, and which of them the
    backward asks for first (a forward's temporaries meet a workspace without them)."""

    def __init__(self, item: int = 4) -> None:
        self.item = item
        self.sizes: dict = {}
        self.kinds: dict = {}
        self.in_backward = False
        self.backward_only: set = set()

    def add(self, name: str, *shape: int, kind: str = SCRATCH) -> None:
        size = math.prod(shape) * self.item
        if name not in self.sizes and self.in_backward:
            self.backward_only.add(name)
        self.sizes[name] = max(size, self.sizes.get(name, 0))
        self.kinds.setdefault(name, kind)

    def ones(self, n: int, scale: float = 1.0) -> None:
        """``layers.ones``: cached vectors for row / column sums."""
        self.add(f"ones.{n}.{scale!r}", n)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    @property
    def backward_bytes(self) -> int:
        return sum(self.sizes[name] for name in self.backward_only)

    def terms(self) -> dict:
        out = {ACT: 0, LOGITS: 0, SCRATCH: 0}
        for name, size in self.sizes.items():
            out[self.kinds[name]] += size
        return out


# -- the layers' workspace names (hpcps.model.layers / attention / encdec) -----------------

def _layernorm(buf: Buffers, name: str, rows: int, c: int, kind: str = ACT) -> None:
    buf.add(name + ".xhat", rows, c, kind=kind)
    buf.add(name + ".out", rows, c, kind=kind)
    buf.ones(c, 1.0 / c)


def _layernorm_backward(buf: Buffers, name: str, rows: int, c: int) -> None:
    buf.add("tmp.norm", rows, c)
    buf.ones(rows)                                   # column sums of the LN gradients
    buf.add(name + ".dx", rows, c)


def _layernorm_linear(buf: Buffers, name: str, rows: int, c: int, out_f: int, bias: bool,
                      out: bool = True, kind: str = ACT, out_kind: str = ACT) -> None:
    """The normalized rows and the LayerNorm-folded weights (and bias) a fused linear keeps;
    its output unless the caller gives one."""
    buf.add(name + ".xhat", rows, c, kind=kind)
    buf.ones(c, 1.0 / c)
    buf.add(name + ".w_eff", out_f, c, kind=kind)
    if bias:
        buf.add(name + ".b_eff", out_f, kind=kind)
    if out:
        buf.add(name + ".out", rows, out_f, kind=out_kind)


def _layernorm_linear_backward(buf: Buffers, name: str, rows: int, c: int, out_f: int,
                               bias: bool) -> None:
    buf.add(name + ".m", out_f, c)
    if bias:
        buf.ones(rows)
    buf.add(name + ".dx", rows, c)
    buf.ones(c, 1.0 / c)
    buf.add("tmp.norm", rows, c)


def _linear_backward(buf: Buffers, name: str, rows: int, in_f: int, bias: bool) -> None:
    if bias:
        buf.ones(rows)
    buf.add(name + ".dx", rows, in_f)


def _scores(buf: Buffers, name: str, b: int, h: int, tq: int, tk: int, causal: bool,
            dropout: bool, keep_probs: bool) -> None:
    """The attention core's probabilities: kept (B, H, Tq, Tk), or a head group's scratch."""
    if causal:
        buf.add(f"causal.{tq}.{tk}", tq, tk)
    buf.ones(tk)
    if keep_probs:
        buf.add(name + ".att", b, h, tq, tk, kind=ACT)
        if dropout:
            buf.add(name + ".att_drop", b, h, tq, tk, kind=ACT)
        return
    hc = head_chunk(b, h, tq, tk, buf.item)
    buf.add("tmp.attn.chunk", b, hc, tq, tk)
    if dropout:
        buf.add("tmp.attn.chunk_drop", b, hc, tq, tk)


def _scores_backward(buf: Buffers, b: int, h: int, tq: int, tk: int, dropout: bool,
                     keep_probs: bool) -> None:
    if keep_probs:
        buf.add("tmp.attn.datt", b, h, tq, tk)
        return
    hc = head_chunk(b, h, tq, tk, buf.item)
    buf.add("tmp.attn.chunk", b, hc, tq, tk)
    if dropout:
        buf.add("tmp.attn.chunk_drop", b, hc, tq, tk)
    buf.add("tmp.attn.chunk_datt", b, hc, tq, tk)


@dataclass(frozen=True)
class Blocks:
    """What the blocks of one stack share: width, heads, bias, dropout (on when training
    draws masks), and whether attention keeps its probabilities."""
    c: int
    h: int
    bias: bool
    dropout: bool
    keep_probs: bool


def _self_attention(buf: Buffers, p: str, blk: Blocks, b: int, t: int, causal: bool) -> None:
    c = blk.c
    buf.add(f"qscale.{c}.{blk.h}", 3 * c)
    _layernorm_linear(buf, p + ".qkv", b * t, c, 3 * c, blk.bias)
    buf.add(p + ".y", b * t, c, kind=ACT)
    _scores(buf, p, b, blk.h, t, t, causal, blk.dropout, blk.keep_probs)


def _self_attention_backward(buf: Buffers, blk: Blocks, b: int, t: int) -> None:
    c, rows = blk.c, b * t
    _linear_backward(buf, "bwd.attn.proj", rows, c, blk.bias)
    buf.add("bwd.attn.dqkv", rows, 3 * c)
    _scores_backward(buf, b, blk.h, t, t, blk.dropout, blk.keep_probs)
    _layernorm_linear_backward(buf, "bwd.attn.qkv", rows, c, 3 * c, blk.bias)


def _mlp(buf: Buffers, p: str, blk: Blocks, rows: int) -> None:
    c = blk.c
    buf.add("tmp.fc.out", rows, 4 * c)
    _layernorm_linear(buf, p + ".fc", rows, c, 4 * c, blk.bias, out=False)
    buf.add("tmp.gelu.q", rows, 4 * c)
    buf.add("tmp.gelu.h", rows, 4 * c)
    buf.add(p + ".gelu.out", rows, 4 * c, kind=ACT)
    buf.add(p + ".gelu.grad", rows, 4 * c, kind=ACT)


def _mlp_backward(buf: Buffers, blk: Blocks, rows: int) -> None:
    c = blk.c
    _linear_backward(buf, "bwd.mlp.proj", rows, 4 * c, blk.bias)
    buf.add("bwd.mlp.gelu.dx", rows, 4 * c)
    _layernorm_linear_backward(buf, "bwd.mlp.fc", rows, c, 4 * c, blk.bias)


def _encoder_block(buf: Buffers, names: str, blk: Blocks, b: int, t: int) -> None:
    buf.add("tmp.branch", b * t, blk.c)
    _self_attention(buf, names + "attn", blk, b, t, causal=False)
    _mlp(buf, names + "mlp", blk, b * t)


def _encoder_block_backward(buf: Buffers, blk: Blocks, b: int, t: int) -> None:
    if blk.dropout:
        buf.add("bwd.masked", b * t, blk.c)
    _mlp_backward(buf, blk, b * t)
    _self_attention_backward(buf, blk, b, t)


def _decoder_block(buf: Buffers, names: str, blk: Blocks, b: int, t: int, s: int) -> None:
    c, nt = blk.c, b * t
    buf.add("tmp.branch", nt, c)
    _self_attention(buf, names + "attn", blk, b, t, causal=True)
    p = names + "cross"
    _layernorm_linear(buf, p + ".q", nt, c, c, blk.bias)
    buf.add(p + ".kv.out", b * s, 2 * c, kind=ACT)
    buf.add(p + ".y", nt, c, kind=ACT)
    _scores(buf, p, b, blk.h, t, s, False, blk.dropout, blk.keep_probs)
    _mlp(buf, names + "mlp", blk, nt)


def _decoder_block_backward(buf: Buffers, blk: Blocks, b: int, t: int, s: int) -> None:
    c, nt, ns = blk.c, b * t, b * s
    if blk.dropout:
        buf.add("bwd.masked", nt, c)
    _mlp_backward(buf, blk, nt)
    _linear_backward(buf, "bwd.cross.proj", nt, c, blk.bias)
    buf.add("bwd.cross.dq", nt, c)
    buf.add("bwd.cross.dkv", ns, 2 * c)
    _scores_backward(buf, b, blk.h, t, s, blk.dropout, blk.keep_probs)
    _linear_backward(buf, "bwd.cross.kv", ns, c, blk.bias)
    _layernorm_linear_backward(buf, "bwd.cross.q", nt, c, c, blk.bias)
    _self_attention_backward(buf, blk, b, t)


def _stack_forward(buf: Buffers, tag: str, n_blocks: int, rows: int, c: int, recompute: str,
                   forward) -> None:
    """``hpcps.model.recompute.BlockActivations``: every block's activations under its own
    names, or (block mode) each block's input and one shared set."""
    if recompute == "block":
        for i in range(n_blocks):
            buf.add(f"{tag}h{i}.input", rows, c, kind=ACT)
        forward(tag + "blk.")
    else:
        for i in range(n_blocks):
            forward(f"{tag}h{i}.")


def _stack_backward(buf: Buffers, tag: str, rows: int, c: int, recompute: str, forward,
                    backward) -> None:
    """The blocks' backward; in block mode each block's forward runs again first, from a
    copy of its input into the shared set."""
    if recompute == "block":
        buf.add(tag + "recompute.x", rows, c, kind=ACT)
        forward(tag + "blk.")
    backward()


def _embedding_backward(buf: Buffers, rows: int, vocab: int) -> None:
    if rows * vocab <= ONE_HOT_LIMIT:
        buf.add("bwd.emb.onehot", vocab, rows)


def _mask_hash(b: int, elements: int) -> int:
    """``layers.dropout_mask`` of ``elements`` per sequence, while its hash words exist."""
    return MASK_HASH_BYTES * b * elements


def _total(buf: Buffers, kept: int, forward_transient: int, backward_transient: int) -> dict:
    """The terms at the step's peak: the whole workspace, the kept arrays, and the largest
    temporary, a forward one counted only beyond the buffers the backward adds later."""
    out = buf.terms()
    out[ACT] += kept
    out[SCRATCH] += max(backward_transient, forward_transient - buf.backward_bytes, 0)
    return out


# -- the T5-style encoder-decoder ----------------------------------------------------------

@dataclass(frozen=True)
class EncDecShape:
    n_layer: int
    n_dec_layer: int
    n_head: int
    n_embd: int
    src_vocab: int
    tgt_vocab: int
    max_src_len: int          # dropout masks of attention probabilities are drawn at these
    max_tgt_len: int
    bias: bool = False
    dropout: float = 0.0


def seq2seq_workspace(e: EncDecShape, b: int, s: int, t: int, recompute: str,
                      item: int = 4) -> Buffers:
    """The workspace of a training step over b pairs padded to s source / t target tokens
    (and of an evaluation at the same shapes, which reuses it), in the step's order."""
    buf = Buffers(item)
    c, ns, nt = e.n_embd, b * s, b * t
    blk = Blocks(c, e.n_head, e.bias, e.dropout > 0, recompute == "none")

    def encoder(names: str) -> None:
        _encoder_block(buf, names, blk, b, s)

    def decoder(names: str) -> None:
        _decoder_block(buf, names, blk, b, t, s)

    buf.add("enc.x", ns, c, kind=ACT)
    _stack_forward(buf, "enc.", e.n_layer, ns, c, recompute, encoder)
    _layernorm(buf, "enc.lnf", ns, c)
    buf.add("dec.x", nt, c, kind=ACT)
    _stack_forward(buf, "dec.", e.n_dec_layer, nt, c, recompute, decoder)
    # the head: all target rows' logits and their probabilities (cross-entropy, not in place)
    _layernorm_linear(buf, "dec.head", nt, c, e.tgt_vocab, e.bias, kind=SCRATCH,
                      out_kind=LOGITS)
    buf.add("xent.probs", nt, e.tgt_vocab, kind=LOGITS)
    buf.ones(e.tgt_vocab)
    buf.in_backward = True
    _layernorm_linear_backward(buf, "bwd.head", nt, c, e.tgt_vocab, e.bias)
    buf.add("bwd.dec.resid", nt, c)
    buf.add("bwd.enc.out", ns, c)
    _stack_backward(buf, "dec.", nt, c, recompute, decoder,
                    lambda: _decoder_block_backward(buf, blk, b, t, s))
    _embedding_backward(buf, nt, e.tgt_vocab)
    buf.add("bwd.enc.resid", ns, c)
    _layernorm_backward(buf, "bwd.enc.lnf", ns, c)
    _stack_backward(buf, "enc.", ns, c, recompute, encoder,
                    lambda: _encoder_block_backward(buf, blk, b, s))
    _embedding_backward(buf, ns, e.src_vocab)
    return buf


def seq2seq_bytes(e: EncDecShape, b: int, s: int, t: int, recompute: str,
                  item: int = 4) -> dict:
    """{activations, logits, scratch} of one training step over b pairs padded to s / t."""
    buf = seq2seq_workspace(e, b, s, t, recompute, item)
    c, h, ns, nt = e.n_embd, e.n_head, b * s, b * t
    sf, tf = e.max_src_len, e.max_tgt_len
    enc_rstd, dec_rstd = 2 * ns, 3 * nt              # LayerNorm rstd vectors per block
    enc_masks = dec_masks = emb_masks = 0
    if e.dropout:
        emb_masks = (ns + nt) * c
        enc_masks = b * h * sf * sf + 2 * ns * c
        dec_masks = b * h * (tf * tf + tf * sf) + 3 * nt * c
    if recompute == "block":                         # one block's caches at a time
        per_block = max(enc_rstd + enc_masks, dec_rstd + dec_masks)
    else:
        per_block = e.n_layer * (enc_rstd + enc_masks) + e.n_dec_layer * (dec_rstd + dec_masks)
    kept = (per_block + emb_masks + ns + nt + ns) * item     # + lnf, head rstd; key padding mask
    # a block's masks are drawn before they are kept: the hash words stand in for them
    mask_hash = max(0, _mask_hash(b, h * max(sf * sf, tf * tf, tf * sf))
                    - min(enc_masks, dec_masks) * item) if e.dropout else 0
    backward = max(scatter_add_bytes(nt, e.tgt_vocab, c, item, one_hot_kept=True),
                   scatter_add_bytes(ns, e.src_vocab, c, item, one_hot_kept=True),
                   e.tgt_vocab * c * item if e.bias else 0,    # the head's folded-bias gradient
                   mask_hash if recompute == "block" else 0)   # masks drawn again
    return _total(buf, kept, mask_hash, backward)


# -- BERT ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BertShape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab: int
    bias: bool = False
    dropout: float = 0.0


def bert_workspace(s: BertShape, b: int, t: int, rows: int, recompute: str,
                   item: int = 4) -> Buffers:
    """The workspace of a training step over b sequences of t tokens, ``rows`` of them
    predicted (and of an evaluation at the same shape, which reuses it), in the step's
    order."""
    buf = Buffers(item)
    c, n, v = s.n_embd, b * t, s.vocab
    blk = Blocks(c, s.n_head, s.bias, s.dropout > 0, recompute == "none")

    def encoder(names: str) -> None:
        _encoder_block(buf, names, blk, b, t)

    buf.add("x", n, c, kind=ACT)
    _stack_forward(buf, "", s.n_layer, n, c, recompute, encoder)
    # the MLM head on the predicted rows: dense + GELU, then the decoder a block at a time
    _layernorm_linear(buf, "mlm.dense", rows, c, c, s.bias)
    for name in ("tmp.gelu.q", "tmp.gelu.h"):
        buf.add(name, rows, c)
    for name in ("mlm.gelu.out", "mlm.gelu.grad"):
        buf.add(name, rows, c, kind=ACT)
    _layernorm(buf, "head.ln", rows, c)
    step = rows_per_chunk(rows, v, item)
    buf.add("head.logits", step, v, kind=LOGITS)
    buf.ones(v)
    buf.in_backward = True
    buf.add("bwd.head.dy", rows, c)
    buf.ones(step)                                  # the output bias's gradient, per block
    if step < rows:
        buf.add("bwd.head.dw", v, c)
        if rows % step:
            buf.ones(rows % step)
    _layernorm_backward(buf, "bwd.head.ln", rows, c)
    buf.add("bwd.mlm.gelu.dx", rows, c)
    _layernorm_linear_backward(buf, "bwd.mlm.dense", rows, c, c, s.bias)
    buf.add("bwd.resid", n, c)
    _stack_backward(buf, "", n, c, recompute, encoder,
                    lambda: _encoder_block_backward(buf, blk, b, t))
    _embedding_backward(buf, n, v)
    return buf


def bert_bytes(s: BertShape, b: int, t: int, rows: int, recompute: str, item: int = 4) -> dict:
    """{activations, logits, scratch} of one training step (see ``bert_workspace``)."""
    buf = bert_workspace(s, b, t, rows, recompute, item)
    c, n = s.n_embd, b * t
    rstd, masks, emb_mask = 2 * n, 0, 0
    if s.dropout:
        emb_mask = n * c
        masks = b * s.n_head * t * t + 2 * n * c
    per_block = rstd + masks if recompute == "block" else s.n_layer * (rstd + masks)
    # the predicted rows gathered for the head (their indices and targets) and two rstd
    kept = (per_block + emb_mask + rows * c + 2 * rows) * item + 16 * rows
    # a block's masks are drawn before they are kept: the hash words stand in for them
    mask_hash = max(0, _mask_hash(b, s.n_head * t * t) - masks * item) if s.dropout else 0
    backward = max(scatter_add_bytes(n, s.vocab, c, item, one_hot_kept=True),
                   mask_hash if recompute == "block" else 0)
    return _total(buf, kept, mask_hash, backward)
