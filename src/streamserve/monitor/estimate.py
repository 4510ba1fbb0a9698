"""Quality estimated before the labels come: confidence-based performance estimation (CBPE).

For a calibrated classifier the probability it gives its predicted class is the chance that the prediction is
right, so the expected confusion matrix follows from the probabilities alone (NannyML's CBPE): a prediction of
class j adds P(j) to the expected true positives of j and 1 - P(j) to its false positives, and every
prediction of another class adds P(j) to the false negatives of j. Accuracy is the mean probability of the
predicted class; precision, recall and F1 come from the expected counts (of the positive class for a binary
classifier, the macro average over the predicted classes otherwise).

The estimate is only as good as the calibration: tests/unit/test_monitor_estimate.py bounds its error on a
calibrated model (within 0.02 of the measured accuracy over 5,000 events) and shows it off on a miscalibrated
one. Predictions without probabilities for every class give no estimate for more than two classes.
"""

from __future__ import annotations

import numpy as np

from streamserve.monitor.measures import FloatArray, IntArray

ESTIMATED_METRICS = ("accuracy", "precision", "recall", "f1")


def estimated(proba: FloatArray | None, y_pred: IntArray, positive: int | None) -> dict[str, float | None]:
    """Expected accuracy, precision, recall and F1 of predictions `y_pred` (class indices) given `proba`."""
    if proba is None or y_pred.shape[0] == 0:
        return dict.fromkeys(ESTIMATED_METRICS)
    n, k = proba.shape
    rows = np.arange(n)
    accuracy = float(proba[rows, y_pred].mean())
    predicted = np.zeros((n, k), dtype=bool)
    predicted[rows, y_pred] = True
    tp = np.where(predicted, proba, 0.0).sum(axis=0)
    fp = np.where(predicted, 1.0 - proba, 0.0).sum(axis=0)
    fn = np.where(predicted, 0.0, proba).sum(axis=0)
    precision = np.divide(tp, tp + fp, out=np.zeros(k), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(k), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(k), where=(2 * tp + fp + fn) > 0)
    if k == 2 and positive is not None:
        return {
            "accuracy": accuracy,
            "precision": float(precision[positive]),
            "recall": float(recall[positive]),
            "f1": float(f1[positive]),
        }
    present = predicted.any(axis=0)
    return {
        "accuracy": accuracy,
        "precision": float(precision[present].mean()),
        "recall": float(recall[present].mean()),
        "f1": float(f1[present].mean()),
    }
