"""The monitor's measures equal scikit-learn's on the same pairs; CBPE is close on a calibrated model; the
comparisons name the better version or say "not yet distinguishable"."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from streamserve.monitor.compare import (
    BASELINE_BETTER,
    CANDIDATE_BETTER,
    UNDISTINGUISHABLE,
    Regressed,
    compare,
    delong_paired,
)
from streamserve.monitor.estimate import estimated
from streamserve.monitor.measures import binary_auc, classified, classifier_metrics, per_class, regressor_metrics


def _binary(n: int, seed: int, noise: float = 1.0) -> tuple[list[str], list[str], list[float]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(2.5 * (y - 0.5) + rng.normal(0, noise, n))))
    p = np.round(p, 3)  # ties, as real scores have
    return [str(v) for v in y], [str(int(v >= 0.5)) for v in p], [float(v) for v in p]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_binary_measures_equal_sklearn(seed: int) -> None:
    true, predicted, scores = _binary(700, seed)
    c = classified(true, predicted, scores, [None] * len(true), "1")
    got = classifier_metrics(c)
    y = np.array(true, dtype=int)
    yp = np.array(predicted, dtype=int)
    s = np.array(scores)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, yp), abs=1e-12)
    assert got["precision"] == pytest.approx(skm.precision_score(y, yp), abs=1e-12)
    assert got["recall"] == pytest.approx(skm.recall_score(y, yp), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(y, yp), abs=1e-12)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, s), abs=1e-12)
    assert got["brier"] == pytest.approx(skm.brier_score_loss(y, s), abs=1e-12)


def test_multiclass_measures_equal_sklearn() -> None:
    rng = np.random.default_rng(5)
    classes = ["bearing", "none", "overheat"]
    n = 900
    y = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    true = [classes[i] for i in y]
    predicted = [classes[i] for i in proba.argmax(axis=1)]
    maps = [dict(zip(classes, row.tolist(), strict=True)) for row in proba]
    c = classified(true, predicted, proba.max(axis=1).tolist(), maps, None)
    got = classifier_metrics(c)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(true, predicted), abs=1e-12)
    assert got["precision"] == pytest.approx(skm.precision_score(true, predicted, average="macro"), abs=1e-12)
    assert got["recall"] == pytest.approx(skm.recall_score(true, predicted, average="macro"), abs=1e-12)
    assert got["f1"] == pytest.approx(skm.f1_score(true, predicted, average="macro"), abs=1e-12)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(true, proba, multi_class="ovr", labels=classes), abs=1e-12)
    assert got["log_loss"] == pytest.approx(skm.log_loss(true, proba, labels=classes), abs=1e-12)
    assert got["brier"] == pytest.approx(skm.brier_score_loss(true, proba, labels=classes), abs=1e-12)
    precision, recall, f1, support = per_class(c)
    expected = skm.precision_recall_fscore_support(true, predicted, labels=classes, zero_division=0)
    for mine, theirs in zip((precision, recall, f1, support), expected, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-12)


def test_regressor_measures_equal_sklearn() -> None:
    rng = np.random.default_rng(9)
    true = rng.normal(10, 3, 500)
    predicted = true + rng.normal(0, 1, 500)
    got = regressor_metrics(true, predicted)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(true, predicted), abs=1e-12)
    assert got["rmse"] == pytest.approx(skm.root_mean_squared_error(true, predicted), abs=1e-12)


def test_undefined_measures_are_none_or_zero_like_sklearn() -> None:
    c = classified(["0", "0"], ["0", "0"], [0.1, 0.2], [None, None], "1")
    got = classifier_metrics(c)
    assert got["roc_auc"] is None  # one class only: scikit-learn raises
    assert got["precision"] == skm.precision_score([0, 0], [0, 0], zero_division=0) == 0.0
    assert binary_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5


def test_cbpe_on_a_calibrated_model_is_within_the_stated_tolerance() -> None:
    rng = np.random.default_rng(11)
    n = 5000
    p = rng.beta(2, 2, n)  # calibrated by construction: y ~ Bernoulli(p)
    y = (rng.random(n) < p).astype(int)
    predicted = [str(int(v >= 0.5)) for v in p]
    c = classified([str(v) for v in y], predicted, p.tolist(), [None] * n, "1")
    guess = estimated(c.proba, c.y_pred, c.positive)
    measured = classifier_metrics(c)
    for name in ("accuracy", "precision", "recall", "f1"):
        assert guess[name] == pytest.approx(measured[name], abs=0.02), name
    # A miscalibrated model (overconfident) is estimated too well: CBPE's premise matters.
    sharp = np.clip(0.5 + (p - 0.5) * 3, 0.001, 0.999)
    off = classified([str(v) for v in y], predicted, sharp.tolist(), [None] * n, "1")
    assert estimated(off.proba, off.y_pred, off.positive)["accuracy"] > measured["accuracy"] + 0.05  # type: ignore[operator]


def test_delong_matches_a_direct_computation() -> None:
    true, _, good = _binary(400, 21, noise=0.6)
    _, _, bad = _binary(400, 21, noise=2.0)
    a = classified(true, ["0"] * 400, good, [None] * 400, "1")
    b = classified(true, ["0"] * 400, bad, [None] * 400, "1")
    found = delong_paired(a, b)
    assert found is not None
    y = np.array(true, dtype=int)
    assert found[0] == pytest.approx(skm.roc_auc_score(y, good) - skm.roc_auc_score(y, bad), abs=1e-12)
    assert found[1] > 0


def test_paired_comparison_names_the_better_version_and_equal_ones_are_undistinguishable() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    y = rng.integers(0, 2, n)
    good = 1 / (1 + np.exp(-(3 * (y - 0.5) + rng.normal(0, 1, n))))
    bad = 1 / (1 + np.exp(-(1 * (y - 0.5) + rng.normal(0, 1, n))))
    true = [str(v) for v in y]

    def sample(p: np.ndarray) -> object:
        return classified(true, [str(int(v >= 0.5)) for v in p], p.tolist(), [None] * n, "1")

    better = compare("roc_auc", ("v2 (shadow)", "v1 (live)"), sample(good), sample(bad), paired=True)  # type: ignore[arg-type]
    assert better.verdict == CANDIDATE_BETTER
    assert better.better == "v2 (shadow)"
    assert better.method == "delong"
    worse = compare("accuracy", ("v2 (shadow)", "v1 (live)"), sample(bad), sample(good), paired=True, samples=300)  # type: ignore[arg-type]
    assert worse.verdict == BASELINE_BETTER
    assert worse.better == "v1 (live)"
    assert worse.method == "bootstrap"
    same = compare("roc_auc", ("v2 (shadow)", "v1 (live)"), sample(good), sample(good), paired=True)  # type: ignore[arg-type]
    assert same.verdict == UNDISTINGUISHABLE
    assert same.better is None


def test_unpaired_comparison_and_labels_needed() -> None:
    rng = np.random.default_rng(4)

    def group(n: int, strength: float) -> object:
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(strength * (y - 0.5) + rng.normal(0, 1, n))))
        return classified([str(v) for v in y], [str(int(v >= 0.5)) for v in p], p.tolist(), [None] * n, "1")

    clear = compare("roc_auc", ("v2 (canary)", "v1 (live)"), group(1500, 4.0), group(6000, 1.0), paired=False)  # type: ignore[arg-type]
    assert clear.better == "v2 (canary)"
    equal = compare("roc_auc", ("v2 (canary)", "v1 (live)"), group(300, 2.0), group(2000, 2.0), paired=False)  # type: ignore[arg-type]
    assert equal.verdict == UNDISTINGUISHABLE
    assert equal.labels_needed is None or equal.labels_needed > 0
    few = compare("roc_auc", ("v2 (canary)", "v1 (live)"), group(40, 4.0), group(60, 1.0), paired=False, min_labels=100)  # type: ignore[arg-type]
    assert few.verdict == UNDISTINGUISHABLE
    assert few.labels_needed is not None
    assert few.labels_needed >= 60 + 40


def test_regressor_comparison_by_bootstrap() -> None:
    rng = np.random.default_rng(6)
    true = rng.normal(0, 1, 800)
    close = Regressed(true, true + rng.normal(0, 0.3, 800))
    far = Regressed(true, true + rng.normal(0, 1.0, 800))
    found = compare("mae", ("v2 (shadow)", "v1 (live)"), close, far, paired=True, samples=300)
    assert found.better == "v2 (shadow)"
    assert found.difference is not None
    assert found.difference < 0
