"""A candidate version against the live one: the difference of one measure with its confidence interval.

Paired (a shadow version scored the same events as the live one): the difference on the same labelled events;
unpaired (a canary scored its share of the keys, the live version the rest): two independent samples.
ROC AUC uses DeLong's variance (DeLong, DeLong & Clarke-Pearson 1988, in the fast form of Sun & Xu 2014):
with the covariance of the two AUCs when paired, the sum of their variances when not. Every other measure uses
a percentile bootstrap (the same resample of events for both versions when paired, separate ones when not),
with a fixed seed so that the same pairs always give the same interval.

The verdict names the better version when the interval excludes zero and each side has at least
``min_labels`` labelled pairs; otherwise it is "not yet distinguishable", with the labels still needed: up to
``min_labels`` a side, and beyond that the sample size at which an interval of the width seen (which shrinks
as 1/sqrt(n)) would exclude the difference seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from streamserve.monitor.measures import (
    HIGHER_IS_BETTER,
    Classified,
    FloatArray,
    midranks,
    roc_auc,
    weighted_classifier_metric,
    weighted_regressor_metric,
)

CANDIDATE_BETTER = "candidate better"
BASELINE_BETTER = "baseline better"
UNDISTINGUISHABLE = "not yet distinguishable"
SEED = 24


@dataclass(frozen=True)
class Regressed:
    """The joined pairs of a regressor."""

    true: FloatArray
    predicted: FloatArray

    def __len__(self) -> int:
        return int(self.true.shape[0])


Sample = Classified | Regressed


@dataclass(frozen=True)
class Comparison:
    candidate: str
    baseline: str
    kind: Literal["paired", "unpaired"]
    metric: str
    method: Literal["delong", "bootstrap", "none"]
    candidate_value: float | None
    baseline_value: float | None
    difference: float | None
    """candidate - baseline."""
    low: float | None
    high: float | None
    confidence: float
    n_candidate: int
    n_baseline: int
    verdict: str
    better: str | None
    labels_needed: int | None


def value(metric: str, sample: Sample, weights: FloatArray | None = None) -> float | None:
    """The measure over the sample (weighted: a bootstrap resample)."""
    if len(sample) == 0:
        return None
    w = np.ones(len(sample)) if weights is None else weights
    if isinstance(sample, Regressed):
        return weighted_regressor_metric(metric, sample.true, sample.predicted, w)
    if metric == "roc_auc":
        return roc_auc(sample)
    return weighted_classifier_metric(metric, sample, w)


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _delong_parts(positive: np.ndarray, scores: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray] | None:
    """AUC of each row of scores and its structural components over positives (v01) and negatives (v10)."""
    m = int(positive.sum())
    n = int(positive.shape[0] - m)
    if m < 2 or n < 2:
        return None
    x, y = scores[:, positive], scores[:, ~positive]
    k = scores.shape[0]
    aucs = np.empty(k)
    v01 = np.empty((k, m))
    v10 = np.empty((k, n))
    for r in range(k):
        tx, ty = midranks(x[r]), midranks(y[r])
        tz = midranks(np.concatenate([x[r], y[r]]))
        aucs[r] = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
        v01[r] = (tz[:m] - tx) / n
        v10[r] = 1.0 - (tz[m:] - ty) / m
    return aucs, v01, v10


def _positive_scores(sample: Classified) -> tuple[np.ndarray, FloatArray] | None:
    if not sample.binary or sample.proba is None or sample.positive is None:
        return None
    return sample.y_true == sample.positive, sample.proba[:, sample.positive]


def delong_paired(candidate: Classified, baseline: Classified) -> tuple[float, float] | None:
    """(difference of AUCs, its variance) on the same events."""
    a, b = _positive_scores(candidate), _positive_scores(baseline)
    if a is None or b is None:
        return None
    parts = _delong_parts(a[0], np.vstack([a[1], b[1]]))
    if parts is None:
        return None
    aucs, v01, v10 = parts
    s = np.cov(v01) / v01.shape[1] + np.cov(v10) / v10.shape[1]
    return float(aucs[0] - aucs[1]), float(s[0, 0] + s[1, 1] - 2 * s[0, 1])


def delong_unpaired(candidate: Classified, baseline: Classified) -> tuple[float, float] | None:
    """(difference of AUCs, its variance) of two independent samples."""
    found = []
    for sample in (candidate, baseline):
        scored = _positive_scores(sample)
        parts = None if scored is None else _delong_parts(scored[0], scored[1][np.newaxis, :])
        if parts is None:
            return None
        aucs, v01, v10 = parts
        variance = np.var(v01[0], ddof=1) / v01.shape[1] + np.var(v10[0], ddof=1) / v10.shape[1]
        found.append((float(aucs[0]), float(variance)))
    return found[0][0] - found[1][0], found[0][1] + found[1][1]


def _resample(rng: np.random.Generator, n: int) -> FloatArray:
    return np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)


def bootstrap(
    metric: str, candidate: Sample, baseline: Sample, paired: bool, confidence: float, samples: int
) -> tuple[float, float] | None:
    """Percentile interval of candidate - baseline over resamples of the events."""
    rng = np.random.default_rng(SEED)
    differences = []
    for _ in range(samples):
        wc = _resample(rng, len(candidate))
        wb = wc if paired else _resample(rng, len(baseline))
        c, b = value(metric, candidate, wc), value(metric, baseline, wb)
        if c is not None and b is not None and not (math.isnan(c) or math.isnan(b)):
            differences.append(c - b)
    if len(differences) < max(samples // 2, 2):
        return None
    alpha = 1 - confidence
    low, high = np.quantile(np.asarray(differences), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _labels_needed(
    n_candidate: int,
    n_baseline: int,
    paired: bool,
    interval: tuple[float, float] | None,
    diff: float | None,
    min_labels: int,
) -> int | None:
    short = (
        max(min_labels - n_candidate, 0)
        if paired
        else max(min_labels - n_candidate, 0) + max(min_labels - n_baseline, 0)
    )
    if interval is None or diff is None or diff == 0:
        return short or None
    half = (interval[1] - interval[0]) / 2
    n = n_candidate if paired else n_candidate + n_baseline
    more = max(math.ceil(n * (half / abs(diff)) ** 2) - n, 1)
    return max(short, more)


def compare(
    metric: str,
    names: tuple[str, str],
    candidate: Sample,
    baseline: Sample,
    paired: bool,
    confidence: float = 0.95,
    samples: int = 1000,
    min_labels: int = 100,
) -> Comparison:
    """Compare ``names[0]`` (candidate) with ``names[1]`` (baseline) on one measure."""
    kind: Literal["paired", "unpaired"] = "paired" if paired else "unpaired"
    c_value, b_value = value(metric, candidate), value(metric, baseline)
    diff = None if c_value is None or b_value is None else c_value - b_value
    method: Literal["delong", "bootstrap", "none"] = "none"
    interval: tuple[float, float] | None = None
    if diff is not None and len(candidate) >= 2 and len(baseline) >= 2:
        if metric == "roc_auc" and isinstance(candidate, Classified) and isinstance(baseline, Classified):
            found = delong_paired(candidate, baseline) if paired else delong_unpaired(candidate, baseline)
            if found is not None:
                method = "delong"
                half = _z(confidence) * math.sqrt(max(found[1], 0.0))
                interval = (found[0] - half, found[0] + half)
        else:
            interval = bootstrap(metric, candidate, baseline, paired, confidence, samples)
            method = "bootstrap" if interval is not None else "none"
    enough = min(len(candidate), len(baseline)) >= min_labels
    verdict, better = UNDISTINGUISHABLE, None
    if enough and interval is not None and (interval[0] > 0 or interval[1] < 0):
        candidate_ahead = (interval[0] > 0) == (metric in HIGHER_IS_BETTER)
        verdict = CANDIDATE_BETTER if candidate_ahead else BASELINE_BETTER
        better = names[0] if candidate_ahead else names[1]
    needed = None if better else _labels_needed(len(candidate), len(baseline), paired, interval, diff, min_labels)
    return Comparison(
        candidate=names[0],
        baseline=names[1],
        kind=kind,
        metric=metric,
        method=method,
        candidate_value=c_value,
        baseline_value=b_value,
        difference=diff,
        low=interval[0] if interval else None,
        high=interval[1] if interval else None,
        confidence=confidence,
        n_candidate=len(candidate),
        n_baseline=len(baseline),
        verdict=verdict,
        better=better,
        labels_needed=needed,
    )
