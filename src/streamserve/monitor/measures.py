"""Quality measures of one model version over its joined (prediction, label) pairs, in numpy.

Each measure equals scikit-learn's on the same pairs (tests/unit/test_monitor_measures.py checks it):

- ``accuracy`` is ``accuracy_score``;
- ``precision``, ``recall``, ``f1``: of the positive class for a binary classifier (``average="binary"``), the
  macro average over the classes present in the labels or the predictions for more classes
  (``average="macro"``); per class as ``precision_recall_fscore_support(labels=classes)``; 0.0 where undefined
  (scikit-learn's ``zero_division`` default);
- ``roc_auc``: of the positive class's probability for a binary classifier; one-vs-rest macro average
  (``multi_class="ovr"``) when every prediction carries the probability of every class; None when a class
  needed for it never occurs in the labels;
- ``log_loss``: probabilities clipped to [eps, 1 - eps] like ``log_loss``; ``brier``: ``brier_score_loss``
  (halved for two classes, not for more);
- ``mae``, ``rmse``: ``mean_absolute_error``, ``root_mean_squared_error``.

A measure that needs probabilities is None for a multi-class model whose predictions carry none
(``model.probabilities`` off): its score alone is the probability of one class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "brier")
REGRESSOR_METRICS = ("mae", "rmse")
HIGHER_IS_BETTER = frozenset({"accuracy", "precision", "recall", "f1", "roc_auc"})
LOWER_IS_BETTER = frozenset({"log_loss", "brier", "mae", "rmse"})
EPS = float(np.finfo(np.float64).eps)

FloatArray = np.ndarray
IntArray = np.ndarray


@dataclass(frozen=True)
class Classified:
    """The joined pairs of a classifier as class indices into ``classes`` (sorted, as scikit-learn sorts)."""

    classes: tuple[str, ...]
    y_true: IntArray
    y_pred: IntArray
    proba: FloatArray | None
    """(n, classes) probabilities in ``classes`` order; None when they are not known for every class."""
    positive: int | None
    """Index of the positive class of a binary classifier (the class ``score`` is the probability of)."""

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2 and self.positive is not None

    def __len__(self) -> int:
        return int(self.y_true.shape[0])


def classified(
    true: Sequence[str],
    predicted: Sequence[str],
    scores: Sequence[float],
    probabilities: Sequence[Mapping[str, float] | None],
    positive_class: str | None,
) -> Classified:
    """Pairs as indices. With a probability map on every prediction its classes count too; otherwise a score
    is the positive class's probability, which gives the probabilities of a binary classifier only."""
    full = bool(probabilities) and all(p is not None for p in probabilities)
    names: set[str] = set(true) | set(predicted)
    if full:
        for p in probabilities:
            names.update(p or ())
    if positive_class is not None and not full:
        names.add(positive_class)  # a score-only binary classifier: the score's class, seen or not
    classes = tuple(sorted(names))
    index = {name: i for i, name in enumerate(classes)}
    y_true = np.fromiter((index[t] for t in true), dtype=np.int64, count=len(true))
    y_pred = np.fromiter((index[p] for p in predicted), dtype=np.int64, count=len(predicted))
    positive = index.get(positive_class) if positive_class is not None else None
    if positive is None and len(classes) == 2:
        positive = 1
    proba: FloatArray | None = None
    if full:
        proba = np.zeros((len(true), len(classes)), dtype=np.float64)
        for row, p in enumerate(probabilities):
            for name, value in (p or {}).items():
                proba[row, index[name]] = value
    elif len(classes) == 2 and positive is not None:
        s = np.asarray(scores, dtype=np.float64)
        proba = np.empty((len(true), 2), dtype=np.float64)
        proba[:, positive] = s
        proba[:, 1 - positive] = 1.0 - s
    return Classified(classes, y_true, y_pred, proba, positive if len(classes) == 2 else None)


def _weights(n: int, weights: FloatArray | None) -> FloatArray:
    return np.ones(n, dtype=np.float64) if weights is None else weights


def confusion(c: Classified, weights: FloatArray | None = None) -> FloatArray:
    """(true, predicted) counts, weighted."""
    k = len(c.classes)
    flat = c.y_true * k + c.y_pred
    return np.bincount(flat, weights=_weights(len(c), weights), minlength=k * k).reshape(k, k)


def per_class(
    c: Classified, weights: FloatArray | None = None
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Precision, recall, F1 and support of every class (0.0 where a ratio has no denominator)."""
    m = confusion(c, weights)
    tp = np.diag(m)
    predicted = m.sum(axis=0)
    support = m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denominator = predicted + support
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return precision, recall, f1, support


def averaged(c: Classified, weights: FloatArray | None = None) -> tuple[float, float, float]:
    """Precision, recall, F1: of the positive class (binary) or macro over the classes present."""
    precision, recall, f1, support = per_class(c, weights)
    if c.binary and c.positive is not None:
        i = c.positive
        return float(precision[i]), float(recall[i]), float(f1[i])
    m = confusion(c, weights)
    present = (support > 0) | (m.sum(axis=0) > 0)
    if not present.any():
        return 0.0, 0.0, 0.0
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


def accuracy(c: Classified, weights: FloatArray | None = None) -> float:
    w = _weights(len(c), weights)
    return float(np.dot(w, c.y_true == c.y_pred) / w.sum())


def midranks(x: FloatArray) -> FloatArray:
    """1-based ranks with ties given their average rank (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    ordered = x[order]
    n = x.shape[0]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    ranks_sorted = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def binary_auc(positive: np.ndarray, score: FloatArray) -> float | None:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half); None with one class only."""
    n_pos = int(positive.sum())
    n_neg = int(positive.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = midranks(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(c: Classified) -> float | None:
    if c.proba is None:
        return None
    if c.binary and c.positive is not None:
        return binary_auc(c.y_true == c.positive, c.proba[:, c.positive])
    areas = [binary_auc(c.y_true == j, c.proba[:, j]) for j in range(len(c.classes))]
    if any(a is None for a in areas):
        return None
    return float(np.mean([a for a in areas if a is not None]))


def log_losses(c: Classified) -> FloatArray | None:
    """Per pair: -log of the probability given to the true class (clipped like scikit-learn)."""
    if c.proba is None:
        return None
    p = np.clip(c.proba[np.arange(len(c)), c.y_true], EPS, 1 - EPS)
    return np.asarray(-np.log(p))


def brier_terms(c: Classified) -> FloatArray | None:
    """Per pair: the squared error of the probabilities (of the positive class alone for two classes)."""
    if c.proba is None:
        return None
    if c.binary and c.positive is not None:
        return np.asarray((c.proba[:, c.positive] - (c.y_true == c.positive)) ** 2)
    onehot = np.zeros_like(c.proba)
    onehot[np.arange(len(c)), c.y_true] = 1.0
    return np.asarray(((onehot - c.proba) ** 2).sum(axis=1))


def _mean(values: FloatArray | None, weights: FloatArray | None = None) -> float | None:
    if values is None or values.shape[0] == 0:
        return None
    w = _weights(values.shape[0], weights)
    return float(np.dot(w, values) / w.sum())


def classifier_metrics(c: Classified) -> dict[str, float | None]:
    """Every classifier measure of the module docstring (None without pairs)."""
    if len(c) == 0:
        return dict.fromkeys(CLASSIFIER_METRICS)
    precision, recall, f1 = averaged(c)
    return {
        "accuracy": accuracy(c),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "roc_auc": roc_auc(c),
        "log_loss": _mean(log_losses(c)),
        "brier": _mean(brier_terms(c)),
    }


def regressor_metrics(true: FloatArray, predicted: FloatArray) -> dict[str, float | None]:
    if true.shape[0] == 0:
        return dict.fromkeys(REGRESSOR_METRICS)
    error = predicted - true
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error**2).mean()))}


def weighted_classifier_metric(metric: str, c: Classified, weights: FloatArray) -> float | None:
    """One measure over pairs counted with weights (a bootstrap resample's counts); not roc_auc."""
    if metric == "accuracy":
        return accuracy(c, weights)
    if metric in ("precision", "recall", "f1"):
        return averaged(c, weights)[("precision", "recall", "f1").index(metric)]
    if metric == "log_loss":
        return _mean(log_losses(c), weights)
    if metric == "brier":
        return _mean(brier_terms(c), weights)
    raise ValueError(f"no weighted form of {metric!r}")


def weighted_regressor_metric(metric: str, true: FloatArray, predicted: FloatArray, weights: FloatArray) -> float:
    error = predicted - true
    if metric == "mae":
        return float(np.dot(weights, np.abs(error)) / weights.sum())
    if metric == "rmse":
        return float(np.sqrt(np.dot(weights, error**2) / weights.sum()))
    raise ValueError(f"no regressor metric {metric!r}")
