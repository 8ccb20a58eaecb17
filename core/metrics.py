"""Scoring metrics: class-balanced accuracy, precision, recall, F1, ROC-AUC and Pearson correlation.

Plain-Python, hand-checkable definitions. Every function returns ``None`` where the metric is
undefined (no examples of a class, no variance, no probabilities) rather than a made-up number.
Examples without a prediction (unparseable answers) are left out of the counts; scorers report
them as failures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Confusion:
    """Confusion counts of binary predictions."""

    tp: int
    """Truth 1, predicted 1."""
    fp: int
    """Truth 0, predicted 1."""
    tn: int
    """Truth 0, predicted 0."""
    fn: int
    """Truth 1, predicted 0."""

    @property
    def total(self) -> int:
        """Number of predictions counted."""
        return self.tp + self.fp + self.tn + self.fn


def confusion(truths: Sequence[int], predictions: Sequence[int | None]) -> Confusion:
    """Count TP/FP/TN/FN; pairs whose prediction is None are skipped."""
    if len(truths) != len(predictions):
        raise ValueError(f"{len(truths)} truths but {len(predictions)} predictions")
    tp = fp = tn = fn = 0
    for truth, pred in zip(truths, predictions, strict=True):
        if pred is None:
            continue
        if truth and pred:
            tp += 1
        elif pred:
            fp += 1
        elif truth:
            fn += 1
        else:
            tn += 1
    return Confusion(tp, fp, tn, fn)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def accuracy(c: Confusion) -> float | None:
    """(TP + TN) / total."""
    return _ratio(c.tp + c.tn, c.total)


def precision(c: Confusion) -> float | None:
    """TP / (TP + FP); None when nothing was predicted positive."""
    return _ratio(c.tp, c.tp + c.fp)


def recall(c: Confusion) -> float | None:
    """TP / (TP + FN) (true positive rate); None without positives."""
    return _ratio(c.tp, c.tp + c.fn)


def specificity(c: Confusion) -> float | None:
    """TN / (TN + FP) (true negative rate); None without negatives."""
    return _ratio(c.tn, c.tn + c.fp)


def f1(c: Confusion) -> float | None:
    """2TP / (2TP + FP + FN), the harmonic mean of precision and recall; None when undefined."""
    return _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn)


def balanced_accuracy(c: Confusion) -> float | None:
    """Mean of recall and specificity (class-balanced accuracy); with one class present, that
    class's rate; None without predictions."""
    rates = [r for r in (recall(c), specificity(c)) if r is not None]
    return sum(rates) / len(rates) if rates else None


def roc_auc(truths: Sequence[int], scores: Sequence[float | None]) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann-Whitney U). Pairs with a None score are skipped; None
    when either class is empty."""
    pos = [s for t, s in zip(truths, scores, strict=True) if s is not None and t]
    neg = [s for t, s in zip(truths, scores, strict=True) if s is not None and not t]
    if not pos or not neg:
        return None
    # Rank-based U statistic, O(n log n) with average ranks for ties.
    values = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg], key=lambda x: x[0])
    rank_sum_pos = 0.0
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1][0] == values[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1
        rank_sum_pos += avg_rank * sum(1 for k in range(i, j + 1) if values[k][1])
        i = j + 1
    u = rank_sum_pos - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation coefficient; None when fewer than 2 points or either side is constant."""
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def probability_of_one(logprob_one: float | None, logprob_zero: float | None) -> float | None:
    """P(1) / (P(0) + P(1)) from the two tokens' logprobs; a missing token has probability 0; None
    when both are missing."""
    p1 = math.exp(logprob_one) if logprob_one is not None else 0.0
    p0 = math.exp(logprob_zero) if logprob_zero is not None else 0.0
    if p0 + p1 == 0:
        return None
    return p1 / (p0 + p1)


def binary_metrics(
    truths: Sequence[int], predictions: Sequence[int | None], probabilities: Sequence[float | None] | None = None
) -> dict[str, float | None]:
    """The standard classification metrics of a scorer: balanced accuracy, accuracy, precision,
    recall, F1, AUC (from ``probabilities`` when any is given, else None) and the counts."""
    c = confusion(truths, predictions)
    auc = None
    if probabilities is not None and any(p is not None for p in probabilities):
        auc = roc_auc(truths, probabilities)
    return {
        "balanced_accuracy": balanced_accuracy(c),
        "accuracy": accuracy(c),
        "precision": precision(c),
        "recall": recall(c),
        "specificity": specificity(c),
        "f1": f1(c),
        "auc": auc,
        "tp": c.tp,
        "fp": c.fp,
        "tn": c.tn,
        "fn": c.fn,
    }


def mmcs(learned: torch.Tensor, truth: torch.Tensor, chunk: int = 4096) -> float:
    """Mean max cosine similarity: for each true direction (rows of ``truth [m, d]``), the best cosine
    with any learned direction (rows of ``learned [n, d]``), averaged over the true directions."""
    learned = torch.nn.functional.normalize(learned.detach().float(), dim=1)
    truth = torch.nn.functional.normalize(truth.detach().float(), dim=1)
    best = torch.cat([(truth[i : i + chunk] @ learned.T).max(dim=1).values for i in range(0, len(truth), chunk)])
    return float(best.mean())
