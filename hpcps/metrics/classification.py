"""Classification metrics over string labels: accuracy, precision/recall/F1, confusion.

Conventions follow scikit-learn with ``zero_division=0``: a label that is never
predicted has precision 0, a label that never occurs in the gold data has recall 0,
and F1 is 0 whenever precision + recall is 0. Unless ``labels`` is given, the labels
are the sorted union of gold and predicted labels.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import numpy as np

from hpcps.errors import UserError

AVERAGES = ("macro", "micro", "weighted")


def _check_pair(pred: Sequence[str], gold: Sequence[str]) -> None:
    if isinstance(pred, str) or isinstance(gold, str):
        raise UserError("pred and gold must be lists of labels, not a single string")
    if len(pred) != len(gold):
        raise UserError(f"pred has {len(pred)} labels, gold has {len(gold)}")
    if len(gold) == 0:
        raise UserError("no labels to score")


def _label_set(pred: Sequence[str], gold: Sequence[str],
               labels: Optional[Sequence[str]]) -> list[str]:
    if labels is None:
        return sorted(set(gold) | set(pred))
    labels = list(labels)
    if not labels:
        raise UserError("labels must not be empty")
    if len(set(labels)) != len(labels):
        raise UserError("labels contain duplicates")
    return labels


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def accuracy(pred: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of items whose predicted label equals the gold label."""
    _check_pair(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold)


def precision_recall_f1(pred: Sequence[str], gold: Sequence[str], average: Optional[str] = "macro",
                        labels: Optional[Sequence[str]] = None) -> dict:
    """Precision, recall and F1, per label and averaged.

    Returns ``{"per_label": {label: {"precision", "recall", "f1", "support"}}}`` and,
    unless ``average`` is None, also ``precision``, ``recall``, ``f1`` (averaged as
    asked: macro = unweighted mean over labels, micro = from pooled counts, weighted =
    mean weighted by gold support), ``support`` (items) and ``average``.
    """
    if average is not None and average not in AVERAGES:
        raise UserError(f"unknown average '{average}' (choose from {', '.join(AVERAGES)} or None)")
    _check_pair(pred, gold)
    names = _label_set(pred, gold, labels)
    true_pos: Counter = Counter()
    n_pred: Counter = Counter(pred)
    n_gold: Counter = Counter(gold)
    for p, g in zip(pred, gold):
        if p == g:
            true_pos[g] += 1
    per_label = {}
    for label in names:
        precision = _ratio(true_pos[label], n_pred[label])
        recall = _ratio(true_pos[label], n_gold[label])
        per_label[label] = {"precision": precision, "recall": recall,
                            "f1": _ratio(2 * precision * recall, precision + recall),
                            "support": n_gold[label]}
    result: dict = {"per_label": per_label}
    if average is None:
        return result
    if average == "micro":
        tp = sum(true_pos[label] for label in names)
        precision = _ratio(tp, sum(n_pred[label] for label in names))
        recall = _ratio(tp, sum(n_gold[label] for label in names))
        f1 = _ratio(2 * precision * recall, precision + recall)
    else:
        if average == "macro":
            weights = {label: 1.0 for label in names}
        else:
            weights = {label: float(n_gold[label]) for label in names}
        total = sum(weights.values())
        precision, recall, f1 = (
            _ratio(sum(weights[lab] * per_label[lab][key] for lab in names), total)
            for key in ("precision", "recall", "f1"))
    result.update(average=average, precision=precision, recall=recall, f1=f1,
                  support=sum(n_gold[label] for label in names))
    return result


def confusion_matrix(pred: Sequence[str], gold: Sequence[str],
                     labels: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """``(labels, matrix)`` with ``matrix[i, j]`` = items of gold label ``labels[i]``
    predicted as ``labels[j]`` (rows gold, columns predicted, as scikit-learn).

    Items whose gold or predicted label is not in ``labels`` are not counted.
    """
    _check_pair(pred, gold)
    names = _label_set(pred, gold, labels)
    index = {label: i for i, label in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=np.int64)
    for p, g in zip(pred, gold):
        if p in index and g in index:
            matrix[index[g], index[p]] += 1
    return names, matrix
