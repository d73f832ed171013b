"""BERT-style masked language modelling on a prepared LM corpus.

Items are ``block_size``-token windows drawn like GPT's (``LMBatcher``). In each
window round(mask_prob x T) positions (at least one) are predicted; of those,
mask_token_prob get [MASK] as input, random_token_prob a uniformly random corpus
token, the rest keep their token (BERT's 80/10/10). Every decision is a hash of
the sequence key ``sequence_keys(seed, MASK_STREAM, step, i)``: a pure function
of (seed, step, sequence index), so W workers x b equals one process x W b.

[MASK] is the extra id ``corpus vocab_size``: the model's vocabulary is the
corpus vocabulary + 1. The loss is the mean over the predicted positions and its
weight the number of them, so the servers' weighted mean is the global mean.
Validation: masked-token loss and accuracy on fixed val windows and masks, and
the unigram baseline (always predict the most frequent training token).
"""

from __future__ import annotations

import math

import numpy as np

from hpcps.data.sampler import DROPOUT_STREAM, MASK_STREAM, sequence_keys
from hpcps.errors import UserError
from hpcps.model.bert import BertMLM
from hpcps.workloads.gpt import TokenStreamWorkload, open_lm_corpus

VAL_MASK_STREAM = MASK_STREAM + 0x100   # val masks: fixed, apart from every training step's
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SITE = np.uint64(0xD6E8FEB86659FD93)
_COUNT_CHUNK = 1 << 22


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (wrapping uint64 arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_bits(keys, site: int, n: int) -> np.ndarray:
    """(len(keys), n) uint64 hashes of (key, site, position): independent streams per site."""
    keys = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        seed = _mix64(keys * _GOLDEN + np.uint64(site) * _SITE)
        return _mix64(seed[:, None] + np.arange(n, dtype=np.uint64)[None, :] * _GOLDEN)


def masked_count(length: int, mask_prob: float) -> int:
    """Predicted positions per sequence: round(mask_prob x length), at least 1."""
    return min(length, max(1, int(math.floor(mask_prob * length + 0.5))))


def mask_tokens(tokens: np.ndarray, keys, *, vocab_size: int, mask_id: int, mask_prob: float = 0.15,
                mask_token_prob: float = 0.8, random_token_prob: float = 0.1):
    """(inputs, targets) for MLM: targets hold the original token at predicted positions
    and -1 elsewhere. Row i depends only on tokens[i] and keys[i]."""
    b, t = tokens.shape
    picked_cols = np.argsort(hash_bits(keys, 0, t), axis=1, kind="stable")
    picked_cols = picked_cols[:, :masked_count(t, mask_prob)]
    picked = np.zeros((b, t), dtype=bool)
    picked[np.arange(b)[:, None], picked_cols] = True
    u = (hash_bits(keys, 1, t) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53   # [0, 1)
    to_mask = picked & (u < mask_token_prob)
    to_random = picked & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    random_ids = (hash_bits(keys, 2, t) % np.uint64(vocab_size)).astype(np.int64)
    inputs = np.array(tokens, dtype=np.int64)
    inputs[to_mask] = mask_id
    inputs[to_random] = random_ids[to_random]
    targets = np.where(picked, tokens, -1).astype(np.int64)
    return inputs, targets


class BertWorkload(TokenStreamWorkload):
    name = "bert"

    def __init__(self, cfg, backend, corpus):
        m, bc = cfg.model, cfg.bert
        if bc.mask_token_prob + bc.random_token_prob > 1.0 + 1e-12:
            raise UserError(f"config keys 'bert.mask_token_prob' ({bc.mask_token_prob:g}) + "
                            f"'bert.random_token_prob' ({bc.random_token_prob:g}) exceed 1")
        self.cfg, self.backend = cfg, backend
        self.corpus_vocab = int(corpus.vocab_size)
        self.mask_id = self.corpus_vocab                 # the one extra id
        self.block_size = m.block_size
        for split_name in ("train", "val"):
            n = corpus.split(split_name).n_tokens
            if n < m.block_size + 2:
                raise UserError(f"corpus {cfg.data.path}: the {split_name} split has {n} tokens, "
                                f"fewer than block_size+2 = {m.block_size + 2}")
        self.model = BertMLM(vocab_size=self.corpus_vocab + 1, n_layer=m.n_layer, n_head=m.n_head,
                             n_embd=m.n_embd, block_size=m.block_size, bias=m.bias,
                             dropout=m.dropout, backend=backend,
                             recompute=cfg.train.recompute)
        self.layout = self.model.layout
        self.tokens_per_item = m.block_size
        self.seed = cfg.train.seed
        self.dropout = m.dropout
        self.corpus = corpus
        self.tokenizer = corpus.tokenizer
        self._batchers: dict = {}
        self._unigram = None

    def masked_batch(self, split: str, step: int, lo: int, hi: int):
        x, _ = self.batcher(split).batch(step, lo, hi)
        stream = MASK_STREAM if split == "train" else VAL_MASK_STREAM
        bc = self.cfg.bert
        return mask_tokens(x, sequence_keys(self.seed, stream, step, lo, hi),
                           vocab_size=self.corpus_vocab, mask_id=self.mask_id,
                           mask_prob=bc.mask_prob, mask_token_prob=bc.mask_token_prob,
                           random_token_prob=bc.random_token_prob)

    def memory_bytes(self, batch, recompute=None):
        predicted = masked_count(self.block_size, self.cfg.bert.mask_prob)
        return self.model.memory_bytes(batch, predicted, recompute)

    def train_batch(self, step, lo, hi):
        return self.masked_batch("train", step, lo, hi)

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        inputs, targets = batch
        keys = None
        if self.dropout > 0:
            keys = sequence_keys(self.seed, DROPOUT_STREAM, step, lo, lo + len(inputs))
        loss = self.model.forward_backward(params, grads, self._device(inputs),
                                           self._device(targets), dropout_keys=keys,
                                           on_grad_ready=on_grad_ready)
        return loss, float((targets != -1).sum())

    def unigram_token(self) -> int:
        """The most frequent token of the train split (the trivial predictor)."""
        if self._unigram is None:
            tokens = self.batcher("train").tokens
            counts = np.zeros(self.corpus_vocab, dtype=np.int64)
            n = len(tokens) if isinstance(tokens, np.ndarray) else tokens.n_tokens
            for a in range(0, n, _COUNT_CHUNK):
                chunk = tokens[a:a + _COUNT_CHUNK] if isinstance(tokens, np.ndarray) \
                    else tokens.read(a, min(n, a + _COUNT_CHUNK))
                counts += np.bincount(np.asarray(chunk, dtype=np.int64),
                                      minlength=self.corpus_vocab)
            self._unigram = int(np.argmax(counts))
        return self._unigram

    def eval_sums(self, params, lo, hi):
        sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "unigram_correct": 0.0}
        chunk = max(1, self.cfg.train.batch_size)
        unigram = self.unigram_token()
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            inputs, targets = self.masked_batch("val", 0, a, b)
            nll, correct, n = self.model.eval_stats(params, self._device(inputs),
                                                    self._device(targets))
            sums["loss_sum"] += nll
            sums["correct"] += correct
            sums["count"] += n
            sums["unigram_correct"] += float((targets == unigram).sum())
        return sums

    def finalize_eval(self, sums):
        count = max(sums["count"], 1.0)
        loss = sums["loss_sum"] / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                "val_accuracy": sums["correct"] / count,
                "val_unigram_accuracy": sums["unigram_correct"] / count}

    def describe(self):
        return {**self.describe_stream(self.corpus_vocab + 1), "mask_id": self.mask_id,
                "mask_prob": self.cfg.bert.mask_prob}


def build(cfg, backend, corpus=None):
    corpus = corpus or open_lm_corpus(cfg)
    return BertWorkload(cfg, backend, corpus)
