"""T5-style encoder-decoder on the flat parameter buffer, hand-written backward.

Encoder: source token + learned position embedding -> n_layer pre-LN encoder
blocks (bidirectional self-attention; padded source keys masked) -> LayerNorm.
Decoder: target token + learned position embedding -> n_dec_layer pre-LN decoder
blocks (causal self-attention, cross-attention over the encoder output with the
same key padding mask, MLP) -> LayerNorm -> LM head (tied to the decoder token
embedding by default) -> cross-entropy over the counted target positions.

Differences from T5, on purpose: learned absolute positions instead of relative
position buckets (see ``hpcps.model.encdec``), LayerNorm with mean instead of
RMSNorm, tanh-GELU MLP instead of ReLU, separate source / target vocabularies.

A batch is (src (B, S), src_len (B,), tgt_in (B, T), tgt_out (B, T)): source rows
padded after src_len, tgt_in = BOS + target, tgt_out = target + EOS with -1 on
padding. Decoding (greedy and beam search with a length penalty) reuses the
encoder once per source and caches the decoder's self-attention keys / values.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

from hpcps.backend import CPU, Backend, array_module
from hpcps.errors import UserError
from hpcps.model.bert import check_shape_args
from hpcps.model.checks import check_dropout_keys, check_flat_buffer
from hpcps.model.encdec import (
    INIT_STD,
    Dropout,
    add_decoder_block,
    add_encoder_block,
    add_norm,
    block_range,
    cross_keys_values,
    decoder_block_backward,
    decoder_block_forward,
    decoder_block_step,
    encoder_block_backward,
    encoder_block_forward,
    key_padding_bias,
)
from hpcps.model.layers import (
    cross_entropy_backward,
    cross_entropy_forward,
    embedding_backward,
    layernorm_backward,
    layernorm_forward,
    layernorm_linear_backward,
    layernorm_linear_forward,
)
from hpcps.model.layout import GradReady, ParamLayout, grad_ready_notifier
from hpcps.model.memory_encdec import EncDecShape, seq2seq_bytes
from hpcps.model.recompute import BlockActivations, check_recompute
from hpcps.model.workspace import Workspace

_MAX_WORKSPACES = 8
DEC_SITES = 5            # dropout sites per decoder block (encoder blocks use 3)


def build_layout(*, src_vocab: int, tgt_vocab: int, n_layer: int, n_dec_layer: int,
                 n_embd: int, max_src_len: int, max_tgt_len: int, bias: bool,
                 tie_embeddings: bool, share_embeddings: bool = False) -> ParamLayout:
    """Encoder tensors first, then the decoder's: the backward finishes the decoder from
    its end, then the encoder from its end, so every reported range is contiguous.

    share_embeddings (one vocabulary for both sides): a single token table ``wte`` at
    the very start, read by the encoder and the decoder. Its gradient is final only
    after the encoder's embedding backward, which is why it sits next to enc.wpe.
    """
    c = n_embd
    lay = ParamLayout()
    if share_embeddings:
        lay.add("wte", (src_vocab, c), std=INIT_STD, sparse_rows=not tie_embeddings)
    else:
        lay.add("enc.wte", (src_vocab, c), std=INIT_STD, sparse_rows=True)
    lay.add("enc.wpe", (max_src_len, c), std=INIT_STD)
    for i in range(n_layer):
        add_encoder_block(lay, f"enc.h{i}.", c, bias, INIT_STD / math.sqrt(2 * n_layer))
    add_norm(lay, "enc.lnf", c, bias)
    if not share_embeddings:
        lay.add("dec.wte", (tgt_vocab, c), std=INIT_STD, sparse_rows=not tie_embeddings)
    lay.add("dec.wpe", (max_tgt_len, c), std=INIT_STD)
    for i in range(n_dec_layer):
        add_decoder_block(lay, f"dec.h{i}.", c, bias, INIT_STD / math.sqrt(3 * n_dec_layer))
    add_norm(lay, "dec.lnf", c, bias)
    if not tie_embeddings:
        lay.add("lm_head.w", (tgt_vocab, c), std=INIT_STD)
    return lay


def uniform_nll(logits, probs):
    """Per row: the mean over the vocabulary of -log softmax(logits), i.e. logsumexp minus
    the mean logit. logsumexp comes from the softmax the cross-entropy already computed,
    read at the row's largest logit (its probability is at least 1/V, so never 0)."""
    xp = array_module(logits)
    l2 = logits.reshape(-1, logits.shape[-1])
    rows = xp.arange(l2.shape[0])
    top = l2.argmax(axis=1)
    lse = l2[rows, top] - xp.log(probs[rows, top])
    return lse - l2.mean(axis=1)


def smooth_loss_and_grad(nll_mean, dlogits, targets, uniform_nll, eps: float,
                         dloss: float = 1.0):
    """Turn the mean NLL and its gradient dloss * (softmax - onehot) * valid / count, in
    place, into those of label smoothing: the target distribution (1 - eps) onehot + eps/V.

    loss = (1 - eps) NLL + eps * mean_v(-log p_v); the gradient gains
    dloss * eps * (onehot - 1/V) * valid / count.
    """
    xp = array_module(dlogits)
    t = targets.reshape(-1)
    valid = t != -1
    count = xp.maximum(valid.sum(), 1).astype(dlogits.dtype)
    scale = valid.astype(dlogits.dtype) * (dlogits.dtype.type(eps * dloss) / count)
    rows = xp.arange(dlogits.shape[0])
    dlogits[rows, xp.where(valid, t, 0)] += scale
    dlogits -= (scale / dlogits.shape[1])[:, None]
    smooth_mean = (uniform_nll * valid).sum() / count
    return (1.0 - eps) * nll_mean + eps * smooth_mean


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ((5 + length) / 6) ** alpha; beam scores are log-prob sums divided by it."""
    return ((5.0 + length) / 6.0) ** alpha


class Hypothesis(NamedTuple):
    """A finished beam: ``score`` = log_prob / length_penalty; tokens without EOS."""
    score: float
    tokens: list
    log_prob: float


class Seq2Seq:
    def __init__(self, *, src_vocab: int, tgt_vocab: int, n_layer: int, n_head: int,
                 n_embd: int, max_src_len: int, max_tgt_len: int,
                 n_dec_layer: Optional[int] = None, bias: bool = False, dropout: float = 0.0,
                 tie_embeddings: bool = True, share_embeddings: bool = False,
                 label_smoothing: float = 0.0, backend: Backend = CPU,
                 recompute: str = "none") -> None:
        """recompute: what the forward keeps for the backward (``hpcps.model.recompute``)."""
        n_dec_layer = n_layer if n_dec_layer is None else n_dec_layer
        check_shape_args(src_vocab=src_vocab, tgt_vocab=tgt_vocab, n_layer=n_layer,
                         n_dec_layer=n_dec_layer, n_head=n_head, n_embd=n_embd,
                         max_src_len=max_src_len, max_tgt_len=max_tgt_len)
        if n_embd % n_head:
            raise UserError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {dropout!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label smoothing must be in [0, 1), got {label_smoothing!r}")
        if share_embeddings and src_vocab != tgt_vocab:
            raise UserError(f"shared embeddings need one vocabulary for both sides; the source "
                            f"has {src_vocab} ids and the target {tgt_vocab}")
        self.share_embeddings = bool(share_embeddings)
        self.label_smoothing = float(label_smoothing)
        # the token tables the two sides read (one tensor when shared)
        self.src_wte = "wte" if share_embeddings else "enc.wte"
        self.tgt_wte = "wte" if share_embeddings else "dec.wte"
        self.src_vocab, self.tgt_vocab = int(src_vocab), int(tgt_vocab)
        self.n_layer, self.n_dec_layer, self.n_head = int(n_layer), int(n_dec_layer), int(n_head)
        self.n_embd = int(n_embd)
        self.max_src_len, self.max_tgt_len = int(max_src_len), int(max_tgt_len)
        self.bias, self.dropout, self.tie_embeddings = bool(bias), float(dropout), tie_embeddings
        self.backend, self.xp = backend, backend.xp
        self.recompute = check_recompute(recompute)
        self.layout = build_layout(src_vocab=self.src_vocab, tgt_vocab=self.tgt_vocab,
                                   n_layer=self.n_layer, n_dec_layer=self.n_dec_layer,
                                   n_embd=self.n_embd, max_src_len=self.max_src_len,
                                   max_tgt_len=self.max_tgt_len, bias=self.bias,
                                   tie_embeddings=tie_embeddings,
                                   share_embeddings=self.share_embeddings)
        self._ready_ranges = self._grad_ready_ranges()
        self._workspaces: dict = {}

    # -- public API --------------------------------------------------------------------

    def init_params(self, seed: int):
        return self.backend.asarray(self.layout.init_slice(seed))

    def forward_backward(self, params, grads, src, src_len, tgt_in, tgt_out,
                         dropout_keys: Optional[Sequence[int]] = None,
                         on_grad_ready: Optional[GradReady] = None,
                         loss_scale: float = 1.0) -> float:
        """Overwrite grads with d(loss_scale x mean target-token loss)/d(params); return the
        mean loss (with label smoothing when the model has it: the loss the gradient
        belongs to). ``on_grad_ready(lo, hi)`` hears of each finished gradient range."""
        src, src_len, tgt_in, tgt_out = self._check_batch(src, src_len, tgt_in, tgt_out)
        self._check_buffer(params, "params")
        self._check_buffer(grads, "grads")
        keys = self._check_keys(dropout_keys, src.shape[0])
        ws = self._workspace(src.shape + tgt_in.shape, params.dtype)
        P, G = self.layout.views(params), self.layout.views(grads)
        logits, caches = self._forward(P, src, src_len, tgt_in, keys, ws)
        loss, xent = cross_entropy_forward(logits, tgt_out, ws=ws, name="xent")
        smooth = uniform_nll(logits, xent[0]) if self.label_smoothing else None
        dlogits = cross_entropy_backward(xent, loss_scale)   # overwrites the probabilities
        if smooth is not None:
            loss = smooth_loss_and_grad(loss, dlogits, tgt_out, smooth, self.label_smoothing,
                                        loss_scale)
        self._backward(G, dlogits, caches, ws,
                       grad_ready_notifier(self._ready_ranges, on_grad_ready))
        return float(loss)

    def loss_sum(self, params, src, src_len, tgt_in, tgt_out) -> tuple[float, int]:
        """(sum of the target-token NLL, counted target tokens), no dropout."""
        src, src_len, tgt_in, tgt_out = self._check_batch(src, src_len, tgt_in, tgt_out)
        self._check_buffer(params, "params")
        ws = self._workspace(src.shape + tgt_in.shape, params.dtype)
        logits, _ = self._forward(self.layout.views(params), src, src_len, tgt_in, None, ws)
        loss, _ = cross_entropy_forward(logits, tgt_out, ws=ws, name="xent")
        n = int((tgt_out != -1).sum())
        return float(loss) * n, n

    def logits(self, params, src, src_len, tgt_in):
        """(B, T, tgt_vocab) teacher-forced logits."""
        fake_out = self.xp.zeros(np.shape(tgt_in), dtype=np.int64)
        src, src_len, tgt_in, _ = self._check_batch(src, src_len, tgt_in, fake_out)
        ws = Workspace(self.xp, reuse=False)
        logits, _ = self._forward(self.layout.views(params), src, src_len, tgt_in, None, ws)
        return logits.reshape(tgt_in.shape + (self.tgt_vocab,)).copy()

    def flops_per_pair(self, src_tokens: int, tgt_tokens: int) -> float:
        """6 x matmul parameters x the tokens that use them, plus attention (training)."""
        lay, c = self.layout, self.n_embd
        enc = lay["enc.lnf.w"].offset - lay["enc.wpe"].end
        dec = lay["dec.lnf.w"].offset - lay["dec.wpe"].end
        head = self.tgt_vocab * c
        attn = 12.0 * c * (self.n_layer * src_tokens * src_tokens
                           + self.n_dec_layer * (tgt_tokens * tgt_tokens
                                                 + tgt_tokens * src_tokens))
        return 6.0 * (enc * src_tokens + (dec + head) * tgt_tokens) + attn

    def memory_bytes(self, batch: int, recompute: Optional[str] = None) -> dict:
        """{term: bytes} a training step over ``batch`` pairs at the longest lengths holds
        beyond the params and grads buffers, with this model's recomputation or the one
        given (``hpcps.model.memory_encdec``). One workspace: a step padded shorter needs
        less, but each padded shape keeps its own (up to a few, see ``_workspace``)."""
        shape = EncDecShape(self.n_layer, self.n_dec_layer, self.n_head, self.n_embd,
                            self.src_vocab, self.tgt_vocab, self.max_src_len, self.max_tgt_len,
                            self.bias, self.dropout)
        return seq2seq_bytes(shape, batch, self.max_src_len, self.max_tgt_len,
                             recompute or self.recompute)

    # -- decoding ----------------------------------------------------------------------

    def encode(self, params, src, src_len):
        """(encoder output (N, S, C), key mask (N, 1, 1, S)) without dropout."""
        fake_tgt = self.xp.zeros((np.shape(src)[0], 1), dtype=np.int64)
        src, src_len, _, _ = self._check_batch(src, src_len, fake_tgt, fake_tgt)
        ws = Workspace(self.xp, reuse=False)
        enc, enc_bias, _ = self._encode(self.layout.views(params), src, src_len, None, ws)
        return enc, enc_bias

    def greedy(self, params, src, src_len, bos: int, eos: int, max_len: Optional[int] = None,
               banned: Sequence[int] = ()) -> list:
        """Greedy decoding: a token list per source (without EOS)."""
        return self.beam_search(params, src, src_len, bos, eos, beam=1, max_len=max_len,
                                banned=banned)

    def beam_search(self, params, src, src_len, bos: int, eos: int, beam: int = 4,
                    alpha: float = 0.6, max_len: Optional[int] = None,
                    banned: Sequence[int] = ()) -> list:
        """Beam search, ``beam`` hypotheses per source; finished hypotheses (EOS) are ranked
        by log-prob sum / length_penalty(tokens incl. EOS, alpha). A source stops once it
        has ``beam`` finished hypotheses; at max_len the live beams count as finished.
        beam=1 is greedy decoding. ``banned`` ids (BOS, PAD) are never generated.
        Returns the best token list per source, without EOS."""
        found = self.beam_search_nbest(params, src, src_len, bos, eos, beam, alpha, max_len,
                                       banned)
        return [hyps[0].tokens if hyps else [] for hyps in found]

    def beam_search_nbest(self, params, src, src_len, bos: int, eos: int, beam: int = 4,
                          alpha: float = 0.6, max_len: Optional[int] = None,
                          banned: Sequence[int] = ()) -> list:
        """``beam_search`` keeping every finished hypothesis: per source a list of
        ``Hypothesis`` (score, tokens without EOS, log_prob), best score first."""
        if beam < 1:
            raise UserError(f"beam must be at least 1, got {beam}")
        max_len = self.max_tgt_len if max_len is None else min(max_len, self.max_tgt_len)
        xp = self.xp
        P = self.layout.views(params)
        enc, enc_bias = self.encode(params, src, src_len)
        n = enc.shape[0]
        rows = xp.repeat(xp.arange(n), beam)          # beam k of source b is row b*beam + k
        enc_bias = enc_bias[rows]
        state = self._decode_state(P, enc[rows], max_len)
        active = np.arange(n)                         # sources still searching, in row order
        scores = np.full((n, beam), -np.inf)
        scores[:, 0] = 0.0                            # the first step expands one beam only
        history = np.zeros((n, beam, 0), dtype=np.int64)
        tokens = np.full(n * beam, bos, dtype=np.int64)
        finished: list = [[] for _ in range(n)]
        for pos in range(max_len):
            logp = self.backend.asnumpy(self._step_logprobs(P, state, tokens, pos, enc_bias))
            logp = logp.reshape(len(active), beam, -1).astype(np.float64)
            if len(banned):
                logp[:, :, list(banned)] = -np.inf
            cand = scores[:, :, None] + logp       # the search itself runs on the host
            scores, history, tokens, order = self._select(
                cand, history, [finished[b] for b in active], beam, pos, eos, alpha)
            live = np.array([len(finished[b]) < beam for b in active])
            if not live.any():
                break
            # drop the rows of finished sources: later steps only compute live ones
            keep = (np.flatnonzero(live)[:, None] * beam + np.arange(beam)).reshape(-1)
            active, scores, history = active[live], scores[live], history[live]
            tokens, order, keep = tokens[keep], xp.asarray(order[keep]), xp.asarray(keep)
            state["self_kv"] = [(k[order], v[order]) for k, v in state["self_kv"]]
            if len(active) * beam < len(enc_bias):
                enc_bias = enc_bias[keep]
                state["cross_kv"] = [(k[keep], v[keep]) for k, v in state["cross_kv"]]
        for i, b in enumerate(active):
            if len(finished[b]) < beam:               # ran out of length: live beams count
                for k in range(beam):
                    if np.isfinite(scores[i, k]):
                        finished[b].append(Hypothesis(
                            scores[i, k] / length_penalty(max_len, alpha),
                            history[i, k].tolist(), scores[i, k]))
        # a stable sort: of equal scores the first finished stays first
        return [sorted(f, key=lambda h: -h.score) for f in finished]

    def _select(self, cand, history, finished, beam: int, pos: int, eos: int, alpha: float):
        """One beam step: the best 2*beam extensions per source; EOS ones finish, the rest
        fill the next beams. Returns (scores, history, next tokens, cache row order)."""
        n, _, vocab = cand.shape
        flat = cand.reshape(n, -1)
        width = min(2 * beam, flat.shape[1])
        top = np.argpartition(-flat, width - 1, axis=1)[:, :width]
        new_scores = np.full((n, beam), -np.inf)
        new_hist = np.zeros((n, beam, pos + 1), dtype=np.int64)
        new_tokens = np.full((n, beam), eos, dtype=np.int64)
        order = np.repeat(np.arange(n) * beam, beam).reshape(n, beam)
        for b in range(n):
            if len(finished[b]) >= beam:
                continue
            ranked = top[b][np.argsort(-flat[b, top[b]], kind="stable")]
            k = 0
            for j in ranked:
                score = flat[b, j]
                if not np.isfinite(score):
                    break
                src_beam, token = divmod(int(j), vocab)
                if token == eos:
                    finished[b].append(Hypothesis(score / length_penalty(pos + 1, alpha),
                                                  history[b, src_beam].tolist(), score))
                    if len(finished[b]) >= beam:
                        break
                    continue
                new_scores[b, k] = score
                new_hist[b, k, :pos] = history[b, src_beam]
                new_hist[b, k, pos] = token
                new_tokens[b, k] = token
                order[b, k] = b * beam + src_beam
                k += 1
                if k == beam:
                    break
        return new_scores, new_hist, new_tokens.reshape(-1), order.reshape(-1)

    def _decode_state(self, P: dict, enc, max_len: int) -> dict:
        xp = self.xp
        n = enc.shape[0]
        hs = self.n_embd // self.n_head
        shape = (n, self.n_head, max_len, hs)
        return {"cross_kv": [cross_keys_values(enc, P, f"dec.h{i}.", self.n_head)
                             for i in range(self.n_dec_layer)],
                "self_kv": [(xp.zeros(shape, enc.dtype), xp.zeros(shape, enc.dtype))
                            for _ in range(self.n_dec_layer)]}

    def _step_logprobs(self, P: dict, state: dict, tokens, pos: int, enc_bias):
        """log softmax of the next-token logits (N, V) after ``tokens`` at position pos."""
        xp = self.xp
        x = P[self.tgt_wte][xp.asarray(tokens)][:, None, :] + P["dec.wpe"][pos]
        for i in range(self.n_dec_layer):
            x = decoder_block_step(x, P, f"dec.h{i}.", self.n_head, pos, state["self_kv"][i],
                                   state["cross_kv"][i], enc_bias)
        head = P[self.tgt_wte] if self.tie_embeddings else P["lm_head.w"]
        logits, _ = layernorm_linear_forward(x[:, 0], P["dec.lnf.w"], P.get("dec.lnf.b"), head)
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - xp.log(xp.exp(logits).sum(axis=1, keepdims=True))

    # -- checks and caches -------------------------------------------------------------

    def _check_batch(self, src, src_len, tgt_in, tgt_out):
        xp = self.xp
        src, src_len = xp.asarray(src), xp.asarray(src_len)
        tgt_in, tgt_out = xp.asarray(tgt_in), xp.asarray(tgt_out)
        for name, arr in (("src", src), ("tgt_in", tgt_in), ("tgt_out", tgt_out)):
            if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.shape[0] < 1 or arr.shape[1] < 1:
                raise UserError(f"{name} must be a non-empty (B, T) integer array, got shape "
                                f"{arr.shape} {arr.dtype}")
        b, s = src.shape
        if tgt_in.shape[0] != b or tgt_out.shape != tgt_in.shape:
            raise UserError(f"src {src.shape}, tgt_in {tgt_in.shape} and tgt_out {tgt_out.shape} "
                            "disagree in shape")
        if s > self.max_src_len or tgt_in.shape[1] > self.max_tgt_len:
            raise UserError(f"batch lengths {s} / {tgt_in.shape[1]} exceed max_src_len "
                            f"{self.max_src_len} / max_tgt_len {self.max_tgt_len}")
        if src_len.shape != (b,) or src_len.dtype.kind not in "iu":
            raise UserError(f"src_len must be {b} integers, got shape {src_len.shape}")
        if xp is np:
            if src_len.min() < 1 or src_len.max() > s:
                raise UserError(f"src_len must be in 1..{s} (every source needs a token)")
            for name, arr, vocab, low in (("src", src, self.src_vocab, 0),
                                          ("tgt_in", tgt_in, self.tgt_vocab, 0),
                                          ("tgt_out", tgt_out, self.tgt_vocab, -1)):
                if arr.min() < low or arr.max() >= vocab:
                    raise UserError(f"{name} ids must be in {low}..{vocab - 1}, got "
                                    f"{int(arr.min())}..{int(arr.max())}")
        return src, src_len, tgt_in, tgt_out

    def _check_buffer(self, buf, what: str) -> None:
        check_flat_buffer(buf, self.layout.total, what)

    def _check_keys(self, keys, batch: int):
        return check_dropout_keys(keys, batch, self.dropout, "pair")

    def _workspace(self, shape, dtype) -> Workspace:
        key = (tuple(shape), np.dtype(dtype).str)
        if key not in self._workspaces:
            if len(self._workspaces) >= _MAX_WORKSPACES:   # padded shapes vary: keep a few
                self._workspaces.pop(next(iter(self._workspaces)))
            self._workspaces[key] = Workspace(self.xp)
        return self._workspaces[key]

    def _grad_ready_ranges(self) -> list:
        """Order of the backward: decoder lnf + head, decoder blocks from the last,
        decoder embeddings, encoder lnf, encoder blocks from the last, encoder embeddings."""
        lay = self.layout
        ranges = [(lay["dec.lnf.w"].offset, lay.total)]
        ranges += [block_range(lay, f"dec.h{i}.") for i in reversed(range(self.n_dec_layer))]
        dec_emb = lay["dec.wpe"] if self.share_embeddings else lay["dec.wte"]
        ranges.append((dec_emb.offset, lay["dec.wpe"].end))
        ranges.append((lay["enc.lnf.w"].offset, dec_emb.offset))
        ranges += [block_range(lay, f"enc.h{i}.") for i in reversed(range(self.n_layer))]
        ranges.append((0, lay["enc.wpe"].end))
        return ranges

    # -- forward / backward ------------------------------------------------------------

    def _embed(self, wte, wpe, idx, drop: Dropout, site: int, ws: Workspace, name: str):
        b, t = idx.shape
        x = ws.get(name, (b, t, self.n_embd), wte.dtype)
        self.xp.take(wte, idx, axis=0, out=x)
        x += wpe[:t]
        mask = drop.mask(site, (t, self.n_embd))
        if mask is not None:
            x *= mask
        return x, mask

    def _encode(self, P: dict, src, src_len, keys, ws: Workspace):
        dt = P[self.src_wte].dtype
        drop = Dropout(self.xp, keys, self.dropout, dt)
        enc_bias = key_padding_bias(self.xp, src_len, src.shape[1], dt)
        x, emb_mask = self._embed(P[self.src_wte], P["enc.wpe"], src, drop, 0, ws, "enc.x")
        blocks = BlockActivations(self.recompute, ws, tag="enc.")
        for i in range(self.n_layer):
            blocks.forward(i, x, lambda xi, names, i=i: encoder_block_forward(
                xi, P, f"enc.h{i}.", self.n_head, key_bias=enc_bias, drop=drop, site=1 + 3 * i,
                full_length=self.max_src_len, ws=ws, names=names, keep_probs=blocks.keep_probs))
        enc, lnf = layernorm_forward(x, P["enc.lnf.w"], P.get("enc.lnf.b"), ws=ws, name="enc.lnf")
        return enc, enc_bias, (src, emb_mask, blocks, lnf)

    def _forward(self, P: dict, src, src_len, tgt_in, keys, ws: Workspace):
        enc, enc_bias, enc_caches = self._encode(P, src, src_len, keys, ws)
        drop = Dropout(self.xp, keys, self.dropout, P[self.tgt_wte].dtype)
        base = 1 + 3 * self.n_layer
        y, emb_mask = self._embed(P[self.tgt_wte], P["dec.wpe"], tgt_in, drop, base, ws, "dec.x")
        full = (self.max_tgt_len, self.max_src_len)
        blocks = BlockActivations(self.recompute, ws, tag="dec.")
        for i in range(self.n_dec_layer):
            blocks.forward(i, y, lambda yi, names, i=i: decoder_block_forward(
                yi, enc, P, f"dec.h{i}.", self.n_head, enc_bias=enc_bias, drop=drop,
                site=base + 1 + DEC_SITES * i, full_lengths=full, ws=ws, names=names,
                keep_probs=blocks.keep_probs))
        head = P[self.tgt_wte] if self.tie_embeddings else P["lm_head.w"]
        logits, head_cache = layernorm_linear_forward(y, P["dec.lnf.w"], P.get("dec.lnf.b"), head,
                                                      ws=ws, name="dec.head")
        return logits, (enc_caches, enc.shape, tgt_in, emb_mask, blocks, head_cache)

    def _backward(self, G: dict, dlogits, caches, ws: Workspace, notify) -> None:
        (src, enc_emb_mask, enc_blocks, enc_lnf), enc_shape, tgt_in, emb_mask, blocks, head_cache \
            = caches
        b, t = tgt_in.shape
        c, dt = self.n_embd, dlogits.dtype
        if not self.tie_embeddings:
            G[self.tgt_wte].fill(0)
        head = G[self.tgt_wte] if self.tie_embeddings else G["lm_head.w"]
        dy_head = layernorm_linear_backward(dlogits, head_cache, G["dec.lnf.w"], G.get("dec.lnf.b"),
                                            head, None, ws, "bwd.head", accumulate=False)
        dy = ws.get("bwd.dec.resid", (b, t, c), dt)
        dy[...] = dy_head.reshape(b, t, c)
        notify(0)
        d_enc = ws.get("bwd.enc.out", enc_shape, dt)
        d_enc.fill(0)
        for i in reversed(range(self.n_dec_layer)):
            decoder_block_backward(dy, d_enc, blocks.cache(i), G, f"dec.h{i}.", ws=ws)
            notify(self.n_dec_layer - i)
        step = self.n_dec_layer + 1
        self._embedding_backward(dy, tgt_in, emb_mask, G[self.tgt_wte], G["dec.wpe"], ws)
        notify(step)
        dx = ws.get("bwd.enc.resid", enc_shape, dt)
        dx[...] = layernorm_backward(d_enc, enc_lnf, G["enc.lnf.w"], G.get("enc.lnf.b"), ws,
                                     "bwd.enc.lnf", accumulate=False)
        notify(step + 1)
        for i in reversed(range(self.n_layer)):
            encoder_block_backward(dx, enc_blocks.cache(i), G, f"enc.h{i}.", ws=ws)
            notify(step + 1 + self.n_layer - i)
        if not self.share_embeddings:     # a shared table already holds the decoder's part
            G["enc.wte"].fill(0)
        self._embedding_backward(dx, src, enc_emb_mask, G[self.src_wte], G["enc.wpe"], ws)
        notify(step + 2 + self.n_layer)

    def _embedding_backward(self, dx, idx, mask, dwte, dwpe, ws: Workspace) -> None:
        """Position rows beyond the batch length get 0; token rows are added to dwte."""
        t = idx.shape[1]
        if mask is not None:
            dx *= mask
        self.xp.sum(dx, axis=0, out=dwpe[:t])
        dwpe[t:] = 0
        embedding_backward(dx, idx, dwte, ws, "bwd.emb")
