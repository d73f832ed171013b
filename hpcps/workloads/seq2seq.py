"""English -> Chinese translation with a T5-style encoder-decoder on a parallel corpus.

Corpus: kind ``parallel`` (``hpcps prepare --parallel en:zh_CN``), read through
``SequenceCorpus``: per split the pairs' source / target token lists and texts,
with a tokenizer per side. Each side's model vocabulary is its tokenizer's plus
three ids appended: PAD = V, BOS = V + 1, EOS = V + 2 (V the tokenizer's size).

Item i of step t is train pair ``offsets(seed, TRAIN_STREAM, t, i, n_train)``,
so W workers x b equals one process x W b. With ``seq2seq.length_buckets`` the
step first picks a bucket of similar-length pairs (from (seed, t) alone) and its
items come from that bucket; such a step's gradient is its mean target-token loss
scaled by the bucket's mean target length over the train split's, so a token weighs
about the same whatever its bucket (a step of long pairs makes a larger update).
The scale stays inside the gradient: the loss the workload reports, logs and
combines across workers is always the mean cross-entropy per target token. A
worker's pairs are padded to the longest in its slice: source = tokens[:max_src_len - 1]
+ EOS, decoder input = BOS + tokens[:max_tgt_len - 1], decoder target =
tokens[:max_tgt_len - 1] + EOS (-1 on padding). The loss is the mean over target tokens, weighted by their count.

Evaluation: eval item i is val pair i mod n_val (teacher-forced loss), and the
first ``seq2seq.eval_pairs`` val pairs (at most n_val, those inside the item
range) are decoded with beam search (``seq2seq.beam``; 1 = greedy) and scored
with corpus BLEU (tokenize="zh"). BLEU's n-gram counts are additive, so workers'
sums combine exactly. val_copy_bleu scores the untranslated source: the baseline.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from hpcps.data.sampler import DROPOUT_STREAM, TRAIN_STREAM, offsets, sequence_keys
from hpcps.data.seqcorpus import SequenceCorpus
from hpcps.errors import UserError
from hpcps.metrics.text import _bleu_from_stats, bleu
from hpcps.model.seq2seq import Seq2Seq
from hpcps.workloads.base import Workload

BUCKET_STREAM = 17                        # which length bucket a step draws from
SPECIALS = ("pad", "bos", "eos")          # appended to each tokenizer's vocabulary, in order
DECODE_CHUNK = 32                         # sources decoded together
BLEU_ORDER = 4


class SideVocab:
    """One side's ids: the tokenizer's, then PAD, BOS, EOS."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.base = int(tokenizer.vocab_size)
        self.pad, self.bos, self.eos = self.base, self.base + 1, self.base + 2
        self.size = self.base + len(SPECIALS)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray([i for i in ids if i < self.base], dtype=np.int64))


def open_parallel_corpus(cfg):
    if not cfg.data.path:
        raise UserError("config key 'data.path' is empty: prepare a parallel corpus with "
                        "`hpcps prepare --parallel` and set data.path")
    corpus = SequenceCorpus.open(cfg.data.path)
    if corpus.kind != "parallel":
        raise UserError(f"corpus {cfg.data.path} is a '{corpus.kind}' corpus; workload "
                        "'seq2seq' needs a parallel corpus")
    return corpus


def pad_batch(src_lists, tgt_lists, src: SideVocab, tgt: SideVocab, max_src: int, max_tgt: int):
    """(src (B, S), src_len (B,), tgt_in (B, T), tgt_out (B, T)) padded to the batch max."""
    b = len(src_lists)
    srcs = [np.append(np.asarray(s, dtype=np.int64)[:max_src - 1], src.eos) for s in src_lists]
    tgts = [np.asarray(t, dtype=np.int64)[:max_tgt - 1] for t in tgt_lists]
    s_len = np.array([len(s) for s in srcs], dtype=np.int64)
    t_len = max(len(t) for t in tgts) + 1
    src_ids = np.full((b, int(s_len.max())), src.pad, dtype=np.int64)
    tgt_in = np.full((b, t_len), tgt.pad, dtype=np.int64)
    tgt_out = np.full((b, t_len), -1, dtype=np.int64)
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        src_ids[i, :len(s)] = s
        tgt_in[i, 0] = tgt.bos
        tgt_in[i, 1:len(t) + 1] = t
        tgt_out[i, :len(t)] = t
        tgt_out[i, len(t)] = tgt.eos
    return src_ids, s_len, tgt_in, tgt_out


def bleu_sums(hyps, refs, prefix: str) -> dict:
    """BLEU's additive statistics (n-gram matches / totals, lengths) as eval sums."""
    if not hyps:
        return {}
    stats = bleu(hyps, refs, tokenize="zh")
    out = {f"{prefix}_sys_len": float(stats["sys_len"]),
           f"{prefix}_ref_len": float(stats["ref_len"])}
    for n in range(BLEU_ORDER):
        out[f"{prefix}_correct{n + 1}"] = float(stats["counts"][n])
        out[f"{prefix}_total{n + 1}"] = float(stats["totals"][n])
    return out


def bleu_from_sums(sums: dict, prefix: str) -> float:
    correct = [int(sums.get(f"{prefix}_correct{n + 1}", 0)) for n in range(BLEU_ORDER)]
    total = [int(sums.get(f"{prefix}_total{n + 1}", 0)) for n in range(BLEU_ORDER)]
    return _bleu_from_stats(correct, total, int(sums.get(f"{prefix}_sys_len", 0)),
                            int(sums.get(f"{prefix}_ref_len", 0)))["score"]


class Seq2SeqWorkload(Workload):
    name = "seq2seq"
    recomputes = True

    def __init__(self, cfg, backend, corpus):
        m, sc = cfg.model, cfg.seq2seq
        self.cfg, self.backend, self.corpus = cfg, backend, corpus
        self.src = SideVocab(corpus.tokenizers["src"])
        self.tgt = SideVocab(corpus.tokenizers["tgt"])
        self.n_train, self.n_val = int(corpus.split("train").n), int(corpus.split("val").n)
        for split_name, n in (("train", self.n_train), ("val", self.n_val)):
            if n < 1:
                raise UserError(f"corpus {cfg.data.path} has no {split_name} pairs")
        self.max_src, self.max_tgt = sc.max_src_len, sc.max_tgt_len
        if sc.share_embeddings and (corpus.tokenizers["src"].to_json()
                                    != corpus.tokenizers["tgt"].to_json()):
            raise UserError(f"seq2seq.share_embeddings needs one tokenizer for both sides, but "
                            f"corpus {cfg.data.path} has one per side: prepare it with "
                            f"--joint-vocab or set seq2seq.share_embeddings = false")
        self.model = Seq2Seq(src_vocab=self.src.size, tgt_vocab=self.tgt.size, n_layer=m.n_layer,
                             n_dec_layer=sc.n_dec_layer or m.n_layer, n_head=m.n_head,
                             n_embd=m.n_embd, max_src_len=self.max_src, max_tgt_len=self.max_tgt,
                             bias=m.bias, dropout=m.dropout, tie_embeddings=m.tie_embeddings,
                             share_embeddings=sc.share_embeddings,
                             label_smoothing=sc.label_smoothing, backend=backend,
                             recompute=cfg.train.recompute)
        self.layout = self.model.layout
        self.seed = cfg.train.seed
        self.dropout = m.dropout
        self.n_buckets = sc.length_buckets
        self._mean_lengths = None
        self._buckets = None
        self._bucket_scales = None

    # -- data --------------------------------------------------------------------------

    def _device(self, array):
        return self.backend.asarray(array) if self.backend.is_gpu else array

    def pairs(self, split: str, indices) -> tuple:
        part = self.corpus.split(split)
        idx = np.asarray(indices, dtype=np.int64)
        return part.get("src", idx), part.get("tgt", idx)

    def batch_of(self, split: str, indices):
        src_lists, tgt_lists = self.pairs(split, indices)
        return pad_batch(src_lists, tgt_lists, self.src, self.tgt, self.max_src, self.max_tgt)

    def train_batch(self, step, lo, hi):
        return self.batch_of("train", self.train_indices(step, lo, hi))

    def train_indices(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Train pairs of items [lo, hi) of ``step``. With length buckets, the step first
        draws one pair uniformly; its bucket (of pairs with similar lengths) supplies every
        item of the step, so a step pads little. Each pair stays equally likely."""
        if self.n_buckets <= 1:
            return offsets(self.seed, TRAIN_STREAM, step, lo, hi, self.n_train)
        order, bounds = self.length_buckets()
        b = self.bucket_of_step(step)
        start, size = bounds[b], bounds[b + 1] - bounds[b]
        return order[start + offsets(self.seed, TRAIN_STREAM, step, lo, hi, size)]

    def bucket_of_step(self, step: int) -> int:
        """The length bucket ``step`` draws from: the bucket of one pair drawn uniformly
        from (seed, step) alone, so every worker agrees without talking."""
        _, bounds = self.length_buckets()
        anchor = int(offsets(self.seed, BUCKET_STREAM, step, 0, 1, self.n_train)[0])
        return int(np.searchsorted(bounds, anchor, side="right")) - 1

    def length_buckets(self) -> tuple[np.ndarray, np.ndarray]:
        """(train pair indices sorted by padded length, bucket bounds into that order):
        ``seq2seq.length_buckets`` buckets of (nearly) equal size."""
        if self._buckets is None:
            src, tgt = self._train_positions()
            # sort by the longer side's cost, then the other: neighbours pad to each other
            order = np.lexsort((tgt, src + tgt)).astype(np.int64)
            n = min(self.n_buckets, self.n_train)
            bounds = np.array([self.n_train * k // n for k in range(n + 1)], dtype=np.int64)
            self._buckets = (order, bounds)
        return self._buckets

    def bucket_gradient_scales(self) -> np.ndarray:
        """Per bucket: its mean target positions over the train split's mean, the factor
        its steps' per-token gradient is scaled by (so a token counts about the same in a
        step of short pairs as in one of long pairs)."""
        if self._bucket_scales is None:
            order, bounds = self.length_buckets()
            tgt = self._train_positions()[1][order]
            means = np.array([tgt[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
            self._bucket_scales = means / self.mean_lengths()[1]
        return self._bucket_scales

    def _train_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Source and target positions of every train pair after truncation, with EOS / BOS."""
        part = self.corpus.split("train")
        return (np.minimum(part.lengths("src"), self.max_src - 1) + 1,
                np.minimum(part.lengths("tgt"), self.max_tgt - 1) + 1)

    def mean_lengths(self) -> tuple[float, float]:
        """Mean (source, target) positions of a train pair after truncation, with EOS / BOS."""
        if self._mean_lengths is None:
            src, tgt = self._train_positions()
            self._mean_lengths = (float(src.mean()), float(tgt.mean()))
        return self._mean_lengths

    @property
    def tokens_per_item(self) -> float:
        return sum(self.mean_lengths())

    # -- training ----------------------------------------------------------------------

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        src, src_len, tgt_in, tgt_out = batch
        keys = None
        if self.dropout > 0:
            keys = sequence_keys(self.seed, DROPOUT_STREAM, step, lo, lo + len(src))
        d = self._device
        n_tokens = float((tgt_out != -1).sum())
        scale = 1.0
        if self.n_buckets > 1:
            scale = float(self.bucket_gradient_scales()[self.bucket_of_step(step)])
        loss = self.model.forward_backward(params, grads, d(src), d(src_len), d(tgt_in),
                                           d(tgt_out), dropout_keys=keys, loss_scale=scale,
                                           on_grad_ready=on_grad_ready)
        return loss, n_tokens

    def touched_rows(self, batch):
        if self.model.share_embeddings:
            if not self.layout["wte"].sparse_rows:
                return {}
            return {"wte": np.union1d(batch[0], batch[2])}
        rows = {"enc.wte": np.unique(batch[0])}
        if self.layout["dec.wte"].sparse_rows:
            rows["dec.wte"] = np.unique(batch[2])
        return rows

    # -- evaluation --------------------------------------------------------------------

    def translate(self, params, src_lists, beam=None) -> list[str]:
        """Decoded target texts of source token lists (beam search, or greedy for beam 1)."""
        sc = self.cfg.seq2seq
        beam = sc.beam if beam is None else beam
        out = []
        for a in range(0, len(src_lists), DECODE_CHUNK):
            chunk = src_lists[a:a + DECODE_CHUNK]
            src, src_len, _, _ = pad_batch(chunk, [[]] * len(chunk), self.src, self.tgt,
                                           self.max_src, self.max_tgt)
            hyps = self.model.beam_search(params, self._device(src), self._device(src_len),
                                          self.tgt.bos, self.tgt.eos, beam=beam,
                                          alpha=sc.length_penalty,
                                          banned=(self.tgt.pad, self.tgt.bos))
            out += [self.tgt.decode(h) for h in hyps]
        return out

    def eval_sums(self, params, lo, hi):
        sums = {"loss_sum": 0.0, "count": 0.0}
        chunk = max(1, self.cfg.train.batch_size)
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            src, src_len, tgt_in, tgt_out = self.batch_of("val", np.arange(a, b) % self.n_val)
            d = self._device
            nll, n = self.model.loss_sum(params, d(src), d(src_len), d(tgt_in), d(tgt_out))
            sums["loss_sum"] += nll
            sums["count"] += n
        decode_hi = min(hi, self.cfg.seq2seq.eval_pairs, self.n_val)
        if lo < decode_hi:
            idx = np.arange(lo, decode_hi)
            part = self.corpus.split("val")
            src_lists = part.get("src", idx)
            refs, sources = part.texts("tgt", idx), part.texts("src", idx)
            sums.update(bleu_sums(self.translate(params, src_lists), refs, "bleu"))
            sums.update(bleu_sums(list(sources), refs, "copy"))
            sums["decoded"] = float(len(idx))
        return sums

    def finalize_eval(self, sums):
        loss = sums["loss_sum"] / max(sums["count"], 1.0)
        out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
        if sums.get("decoded"):
            out["val_bleu"] = bleu_from_sums(sums, "bleu")
            out["val_copy_bleu"] = bleu_from_sums(sums, "copy")
        return out

    def flops_per_item(self):
        return self.model.flops_per_pair(*self.mean_lengths())

    def memory_bytes(self, batch, recompute=None):
        return self.model.memory_bytes(batch, recompute)

    def describe(self):
        m, sc = self.cfg.model, self.cfg.seq2seq
        sha = {side: hashlib.sha256(v.tokenizer.to_json().encode()).hexdigest()
               for side, v in (("src", self.src), ("tgt", self.tgt))}
        return {"workload": self.name, "n_params": self.layout.total,
                "src_vocab": self.src.size, "tgt_vocab": self.tgt.size, "specials": list(SPECIALS),
                "n_layer": m.n_layer, "n_dec_layer": sc.n_dec_layer or m.n_layer,
                "n_head": m.n_head, "n_embd": m.n_embd, "max_src_len": sc.max_src_len,
                "max_tgt_len": sc.max_tgt_len, "bias": m.bias,
                "tie_embeddings": m.tie_embeddings,
                "tokenizer_src_sha256": sha["src"], "tokenizer_tgt_sha256": sha["tgt"],
                # only when set: checkpoints from before the option still fit on resume
                **({"share_embeddings": True} if sc.share_embeddings else {})}


def build(cfg, backend, corpus=None):
    corpus = corpus or open_parallel_corpus(cfg)
    return Seq2SeqWorkload(cfg, backend, corpus)
