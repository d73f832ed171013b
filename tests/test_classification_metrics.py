"""Accuracy, precision/recall/F1 and the confusion matrix on hand-computed cases, and
agreement with scikit-learn (zero_division=0) when it is installed."""

import random

import numpy as np
import pytest

from hpcps.errors import UserError
from hpcps.metrics import accuracy, confusion_matrix, precision_recall_f1

GOLD = ["cat", "cat", "dog", "dog", "bird"]
PRED = ["cat", "dog", "dog", "dog", "cat"]   # 'bird' is never predicted


def test_accuracy():
    assert accuracy(PRED, GOLD) == pytest.approx(3 / 5)
    assert accuracy(["a"], ["a"]) == 1.0
    assert accuracy(["a "], ["a"]) == 0.0  # labels are compared exactly


def test_per_label_scores_and_zero_division():
    out = precision_recall_f1(PRED, GOLD, average=None)
    assert list(out) == ["per_label"]
    per = out["per_label"]
    assert list(per) == ["bird", "cat", "dog"]
    assert per["bird"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert per["cat"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert per["dog"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})


def test_macro_micro_weighted_averages():
    macro = precision_recall_f1(PRED, GOLD)
    assert macro["average"] == "macro" and macro["support"] == 5
    assert (macro["precision"], macro["recall"], macro["f1"]) == pytest.approx(
        ((0 + 0.5 + 2 / 3) / 3, (0 + 0.5 + 1) / 3, (0 + 0.5 + 0.8) / 3))
    micro = precision_recall_f1(PRED, GOLD, average="micro")
    assert (micro["precision"], micro["recall"], micro["f1"]) == pytest.approx((0.6, 0.6, 0.6))
    weighted = precision_recall_f1(PRED, GOLD, average="weighted")
    assert weighted["f1"] == pytest.approx((1 * 0 + 2 * 0.5 + 2 * 0.8) / 5)


def test_label_only_in_predictions_has_recall_zero():
    per = precision_recall_f1(["x", "a"], ["a", "a"], average=None)["per_label"]
    assert per["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert per["a"]["precision"] == 1.0 and per["a"]["recall"] == 0.5


def test_confusion_matrix_rows_gold_columns_predicted():
    labels, matrix = confusion_matrix(PRED, GOLD)
    assert labels == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(matrix, [[0, 1, 0], [0, 1, 1], [0, 0, 2]])
    labels, matrix = confusion_matrix(PRED, GOLD, labels=["dog", "cat"])
    assert labels == ["dog", "cat"]
    np.testing.assert_array_equal(matrix, [[2, 0], [1, 1]])  # the 'bird' item is not counted


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="pred has 2 labels, gold has 3"):
        accuracy(["a", "b"], ["a", "b", "c"])
    with pytest.raises(UserError, match="no labels"):
        precision_recall_f1([], [])
    with pytest.raises(UserError, match="unknown average 'samples'"):
        precision_recall_f1(["a"], ["a"], average="samples")
    with pytest.raises(UserError, match="duplicates"):
        confusion_matrix(["a"], ["a"], labels=["a", "a"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_matches_scikit_learn(average):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(4)
    names = ["pos", "neg", "neutral", "rare"]
    gold = [rng.choice(names[:3]) for _ in range(300)] + ["rare"]
    pred = [g if rng.random() < 0.6 else rng.choice(names[:3]) for g in gold]  # 'rare' never predicted
    ours = precision_recall_f1(pred, gold, average=average)
    p, r, f, _ = metrics.precision_recall_fscore_support(gold, pred, average=average, zero_division=0)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((p, r, f), abs=1e-12)
    labels = sorted(names)
    p, r, f, s = metrics.precision_recall_fscore_support(gold, pred, labels=labels, zero_division=0)
    for i, label in enumerate(labels):
        row = ours["per_label"][label]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (p[i], r[i], f[i], s[i]))
    _, matrix = confusion_matrix(pred, gold, labels=labels)
    np.testing.assert_array_equal(matrix, metrics.confusion_matrix(gold, pred, labels=labels))
    assert accuracy(pred, gold) == pytest.approx(metrics.accuracy_score(gold, pred))
