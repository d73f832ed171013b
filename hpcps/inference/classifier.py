"""A trained text classifier (workload ``rnn``): load it, label strings with their class
probabilities, and score it on a classification corpus split.

The label names and the tokenizer come from the checkpoint, so labelling needs no
corpus. A string is read as in training: its first ``rnn.max_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from hpcps.backend import CPU
from hpcps.data.seqcorpus import SequenceCorpus
from hpcps.errors import UserError
from hpcps.inference.checkpoint import (
    check_corpus_tokenizer,
    described,
    encode_text,
    load_params,
    open_for,
    saved_tokenizers,
)
from hpcps.metrics import accuracy, confusion_matrix, precision_recall_f1
from hpcps.model.rnn import RNNClassifier, pad_left, predict

CHUNK = 256                 # strings per forward pass


@dataclass
class Classifier:
    checkpoint: object      # hpcps.checkpoint.CheckpointReader
    model: object           # hpcps.model.rnn.RNNClassifier
    params: object
    tokenizer: object
    labels: list
    max_len: int

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def encode(self, text: str, where: str) -> np.ndarray:
        return encode_text(self.tokenizer, text, where)

    def log_probs(self, token_lists: list,
                  on_progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """(N, labels) float64 log-probabilities of token arrays."""
        backend = self.model.backend
        out = np.empty((len(token_lists), len(self.labels)))
        for a in range(0, len(token_lists), CHUNK):
            tokens, lengths = pad_left(token_lists[a:a + CHUNK], self.max_len)
            logits = self.model.logits(self.params, backend.asarray(tokens),
                                       backend.asarray(lengths))
            out[a:a + len(tokens)] = predict(backend.asnumpy(logits))[1]
            if on_progress is not None:
                on_progress(len(tokens))
        return out

    def top_labels(self, token_lists: list, k: int) -> list:
        """Per string: its k most probable (label, probability), best first."""
        probs = np.exp(self.log_probs(token_lists))
        k = min(k, len(self.labels))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], float(row[j])) for j in top] for row, top in zip(probs, order)]


def load_classifier(path: str, backend=None, purpose: str = "hpcps classify") -> Classifier:
    ck, describe = open_for(path, ("rnn",), purpose)
    tokenizer = saved_tokenizers(ck, ("text",), describe)["text"]
    labels = list(described(ck, describe, "labels"))
    vocab = int(described(ck, describe, "vocab_size"))
    if tokenizer.vocab_size != vocab:
        raise UserError(f"checkpoint {ck.path}: its tokenizer has {tokenizer.vocab_size} tokens "
                        f"but the model's vocabulary has {vocab}")
    r = ck.config.rnn
    model = RNNClassifier(vocab_size=vocab, n_labels=len(labels), embed_dim=r.embed_dim,
                          hidden=r.hidden_size, cell=r.cell, pool=r.pool, bptt=r.bptt,
                          backend=backend or CPU)
    return Classifier(ck, model, load_params(ck, model), tokenizer, labels, r.max_len)


# -- evaluation ---------------------------------------------------------------------------
def open_classification(classifier: Classifier, data_path: str):
    corpus = SequenceCorpus.open(data_path)
    if corpus.kind != "classification":
        corpus.close()
        raise UserError(f"corpus {data_path} is a '{corpus.kind}' corpus; a classifier is "
                        f"evaluated on a classification corpus (`hpcps prepare --langid`)")
    if list(corpus.label_names) != classifier.labels:
        corpus.close()
        raise UserError(f"corpus {data_path} has labels {', '.join(corpus.label_names)}; "
                        f"checkpoint {classifier.checkpoint.path} was trained on "
                        f"{', '.join(classifier.labels)}")
    describe = classifier.checkpoint.manifest.get("describe", {})
    check_corpus_tokenizer(corpus.tokenizers["text"], describe.get("tokenizer_sha256", ""),
                           data_path, classifier.checkpoint.path)
    return corpus


def evaluate(classifier: Classifier, corpus, split: str, max_items: Optional[int],
             on_progress: Optional[Callable[[int], None]] = None) -> dict:
    """Loss, accuracy, macro precision / recall / F1 and the confusion matrix (rows gold,
    columns predicted, in label order) over the first ``max_items`` strings of ``split``,
    with the majority-class baseline of the evaluated strings."""
    part = corpus.split(split)
    n = part.n if max_items is None else min(part.n, max_items)
    gold_ids = part.labels[:n]
    log_probs = classifier.log_probs(part.get("text", np.arange(n)), on_progress)
    pred_ids = log_probs.argmax(axis=1)
    names = classifier.labels
    gold = [names[i] for i in gold_ids]
    pred = [names[i] for i in pred_ids]
    prf = precision_recall_f1(pred, gold, average="macro", labels=names)
    counts = np.bincount(gold_ids, minlength=len(names))
    return {"items": n, "split": split,
            "loss": float(-log_probs[np.arange(n), gold_ids].mean()),
            "accuracy": accuracy(pred, gold), "precision_macro": prf["precision"],
            "recall_macro": prf["recall"], "f1_macro": prf["f1"],
            "majority_accuracy": float(counts.max()) / n, "labels": names,
            "confusion": confusion_matrix(pred, gold, labels=names)[1].tolist()}
