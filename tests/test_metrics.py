"""Metrics with values worked out by hand."""

from __future__ import annotations

import math

import pytest
from saelab.metrics import (
    balanced_accuracy,
    binary_metrics,
    confusion,
    f1,
    pearson,
    precision,
    probability_of_one,
    recall,
    roc_auc,
)


def test_confusion_skips_missing_predictions():
    c = confusion([1, 1, 1, 0, 0, 1], [1, 0, None, 0, 1, 1])
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 1, 1)


def test_binary_metrics_by_hand():
    # truths: 4 positives, 6 negatives; predictions: 3 TP, 1 FN, 2 FP, 4 TN
    truths = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    m = binary_metrics(truths, preds)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["auc"] is None


def test_undefined_metrics_are_none():
    c = confusion([0, 0], [0, 0])
    assert precision(c) is None and recall(c) is None and f1(c) is None
    assert balanced_accuracy(c) == 1.0  # only negatives: the true negative rate
    assert balanced_accuracy(confusion([1], [None])) is None
    assert roc_auc([1, 1], [0.2, 0.3]) is None
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    assert pearson([1], [2]) is None


def test_roc_auc_by_hand_with_ties():
    # positives 0.9, 0.5, 0.3; negatives 0.5, 0.1: pairs won 2 + 1.5 (tie) + 1 = 4.5 of 6
    assert roc_auc([1, 1, 1, 0, 0], [0.9, 0.5, 0.3, 0.5, 0.1]) == pytest.approx(4.5 / 6)
    assert roc_auc([1, 0], [0.2, 0.8]) == 0.0
    assert roc_auc([1, 0, 1], [0.7, 0.4, None]) == 1.0  # missing scores skipped


def test_pearson_by_hand():
    # x = 1,2,3 ; y = 2,4,5: mean 2, 11/3; sxy = 3; sxx = 2; syy = 14/3
    assert pearson([1, 2, 3], [2, 4, 5]) == pytest.approx(3 / math.sqrt(2 * 14 / 3))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_probability_of_one():
    assert probability_of_one(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)
    assert probability_of_one(math.log(0.5), None) == 1.0
    assert probability_of_one(None, None) is None
