"""Text classification with an LSTM / GRU on a ``classification`` sequence corpus
(e.g. language identification of gettext strings, ``hpcps prepare --langid``).

Item i of step t is the train string ``offsets(seed, TRAIN_STREAM, t, i)`` (uniform
with replacement), so BSP with W workers equals one process with the global batch.
Evaluation covers val strings [lo, hi) in stored order (hash order: a fair
sample), capped at the split: accuracy, macro precision / recall / F1 and the
confusion matrix from ``hpcps.metrics``, plus the majority-class baseline.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hpcps.data.sampler import TRAIN_STREAM, offsets
from hpcps.data.seqcorpus import SequenceCorpus
from hpcps.errors import UserError
from hpcps.metrics import accuracy, precision_recall_f1
from hpcps.model.rnn import RNNClassifier, nll, pad_left, predict
from hpcps.workloads.base import Workload

EVAL_CHUNK = 256               # strings per evaluation forward


def open_classification_corpus(cfg):
    if not cfg.data.path:
        raise UserError("config key 'data.path' is empty: build a classification corpus with "
                        "`hpcps prepare --langid ...` and set data.path")
    corpus = SequenceCorpus.open(cfg.data.path)
    if corpus.kind != "classification":
        corpus.close()
        raise UserError(f"corpus {cfg.data.path} is a '{corpus.kind}' corpus; workload 'rnn' "
                        "needs a classification corpus")
    return corpus


class RNNWorkload(Workload):
    name = "rnn"

    def __init__(self, cfg, backend, corpus):
        r = cfg.rnn
        self.cfg, self.backend, self.corpus = cfg, backend, corpus
        self.tokenizer = corpus.tokenizers["text"]
        self.label_names = list(corpus.label_names)
        self.model = RNNClassifier(vocab_size=self.tokenizer.vocab_size,
                                   n_labels=len(self.label_names), embed_dim=r.embed_dim,
                                   hidden=r.hidden_size, cell=r.cell, pool=r.pool, bptt=r.bptt,
                                   backend=backend)
        self.layout = self.model.layout
        self.max_len = r.max_len
        self.seed = cfg.train.seed
        self._mean_len = None

    @property
    def tokens_per_item(self) -> int:
        """Mean kept length of a train string (read on first use: servers never need it)."""
        if self._mean_len is None:
            lengths = np.minimum(self.corpus.split("train").lengths("text"), self.max_len)
            self._mean_len = max(1, int(round(float(lengths.mean()))))
        return self._mean_len

    def _device(self, array):
        return self.backend.asarray(array) if self.backend.is_gpu else array

    def _batch(self, split, indices):
        tokens, lengths = pad_left(split.get("text", indices), self.max_len)
        return tokens, lengths, split.labels[indices]

    def train_batch(self, step, lo, hi):
        split = self.corpus.split("train")
        return self._batch(split, offsets(self.seed, TRAIN_STREAM, step, lo, hi, split.n))

    def loss_and_grad(self, params, grads, batch, step, lo, on_grad_ready=None):
        tokens, lengths, labels = (self._device(a) for a in batch)
        loss = self.model.forward_backward(params, grads, tokens, lengths, labels)
        return loss, float(len(batch[2]))

    def eval_sums(self, params, lo, hi):
        split = self.corpus.split("val")
        K = len(self.label_names)
        confusion = np.zeros((K, K), dtype=np.int64)
        loss_sum = 0.0
        for a in range(lo, min(hi, split.n), EVAL_CHUNK):
            idx = np.arange(a, min(hi, split.n, a + EVAL_CHUNK))
            tokens, lengths, labels = self._batch(split, idx)
            logits = self.model.logits(params, self._device(tokens), self._device(lengths))
            pred, log_probs = predict(self.backend.asnumpy(logits))
            loss_sum += float(nll(log_probs, labels).sum())
            np.add.at(confusion, (labels, pred), 1)
        sums = {"loss_sum": loss_sum, "count": float(confusion.sum())}
        sums.update({f"cm_{g}_{p}": float(confusion[g, p]) for g in range(K) for p in range(K)})
        return sums

    def finalize_eval(self, sums):
        K = len(self.label_names)
        confusion = np.array([[int(sums[f"cm_{g}_{p}"]) for p in range(K)] for g in range(K)])
        count = int(confusion.sum())
        if count == 0:
            return {"val_loss": float("nan")}
        gold, pred = [], []
        for g in range(K):                     # back to label lists for hpcps.metrics
            for p in range(K):
                gold += [self.label_names[g]] * int(confusion[g, p])
                pred += [self.label_names[p]] * int(confusion[g, p])
        prf = precision_recall_f1(pred, gold, average="macro", labels=self.label_names)
        return {"val_loss": sums["loss_sum"] / count,
                "val_accuracy": accuracy(pred, gold),
                "val_precision_macro": prf["precision"], "val_recall_macro": prf["recall"],
                "val_f1_macro": prf["f1"],
                "val_majority_accuracy": float(confusion.sum(axis=1).max()) / count,
                "val_confusion": confusion.tolist()}

    def flops_per_item(self):
        return self.model.flops_per_token() * self.tokens_per_item

    def memory_bytes(self, batch, recompute=None):
        """A step's strings are padded to at most rnn.max_len; the final evaluation runs
        EVAL_CHUNK strings (at most the val split) at a time."""
        chunk = min(EVAL_CHUNK, self.corpus.split("val").n) if self.cfg.train.eval_steps else 0
        return self.model.memory_bytes(batch, self.max_len, eval_batch=chunk)

    def describe(self):
        r = self.cfg.rnn
        return {"workload": self.name, "n_params": self.layout.total,
                "vocab_size": self.tokenizer.vocab_size, "labels": self.label_names,
                "cell": r.cell, "embed_dim": r.embed_dim, "hidden_size": r.hidden_size,
                "tokenizer": self.tokenizer.kind,
                "tokenizer_sha256": hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()}


def build(cfg, backend, corpus=None):
    corpus = corpus or open_classification_corpus(cfg)
    return RNNWorkload(cfg, backend, corpus)
