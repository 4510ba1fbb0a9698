"""The backtest's report: two versions' predictions of the same events compared, with labels when there are.

Pure functions over columns (no Kafka, no models), so the figures can be checked against a recomputation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from typing import Any

import fastavro
import numpy as np

from streamserve.schemas import bundled

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
LATENCY_QUANTILES = (0.5, 0.95, 0.99, 1.0)


def _name(q: float) -> str:
    return "max" if q == 1.0 else "min" if q == 0.0 else f"p{round(q * 100):g}"


def quantiles(values: Sequence[float], which: Iterable[float] = QUANTILES) -> dict[str, float] | None:
    """Named quantiles (min, p1 ... p99, max) of the values, None when there are none."""
    if not len(values):
        return None
    array = np.asarray(values, dtype=np.float64)
    return {_name(q): float(np.quantile(array, q)) for q in which}


def agreement(live: Sequence[str | None], candidate: Sequence[str | None]) -> dict[str, Any]:
    """The share of events both versions give the same class, and the flips: live class -> candidate class."""
    compared = [(a, b) for a, b in zip(live, candidate, strict=True) if a is not None and b is not None]
    confusion: dict[str, dict[str, int]] = {}
    for a, b in compared:
        row = confusion.setdefault(a, {})
        row[b] = row.get(b, 0) + 1
    agree = sum(1 for a, b in compared if a == b)
    return {
        "compared": len(compared),
        "agree": agree,
        "rate": agree / len(compared) if compared else None,
        "flips": len(compared) - agree,
        "confusion": {a: dict(sorted(row.items())) for a, row in sorted(confusion.items())},
    }


def score_deltas(live: Sequence[float], candidate: Sequence[float]) -> dict[str, Any]:
    """Candidate score minus live score: mean, mean absolute and quantiles."""
    delta = np.asarray(candidate, dtype=np.float64) - np.asarray(live, dtype=np.float64)
    return {
        "mean": float(delta.mean()) if len(delta) else None,
        "mean_abs": float(np.abs(delta).mean()) if len(delta) else None,
        "quantiles": quantiles(delta.tolist()),
    }


def decode_labels(values: Iterable[bytes | None]) -> tuple[dict[str, Any], int]:
    """The labels topic's records (schemas/label.avsc) as event id -> label (the last one wins), and how many
    records were not readable labels."""
    schema = bundled("label")
    labels: dict[str, Any] = {}
    unreadable = 0
    for value in values:
        try:
            record = fastavro.schemaless_reader(io.BytesIO(value or b""), schema, None)
        except Exception:  # noqa: BLE001 - any bytes may sit on a topic: counted, never fatal
            unreadable += 1
            continue
        if isinstance(record, dict) and record.get("label") is not None:
            labels[str(record["event_id"])] = record["label"]
    return labels, unreadable


def quality(
    event_ids: Sequence[str | None], scores: Sequence[float], predicted: Sequence[str | None], labels: dict[str, Any]
) -> dict[str, Any]:
    """One version's quality on the labelled events: accuracy for classes, MAE of the score for numbers."""
    correct = labelled = 0
    errors: list[float] = []
    for event_id, score, label in zip(event_ids, scores, predicted, strict=True):
        if event_id is None or event_id not in labels:
            continue
        truth = labels[event_id]
        labelled += 1
        if label is not None:
            correct += str(truth) == label
        elif isinstance(truth, int | float) and not isinstance(truth, bool):
            errors.append(abs(score - float(truth)))
    result: dict[str, Any] = {"labelled": labelled}
    if labelled and not errors:
        result["accuracy"] = correct / labelled
    if errors:
        result["mae"] = float(np.mean(errors))
    return result


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def render(report: dict[str, Any]) -> str:
    """The report for a terminal."""
    lines = [
        f"backtest of {report['model']} on {report['topic']} ({report['from']} .. {report['to']}): "
        f"{report['events']} records in {len(report['ranges'])} partition range(s)",
        f"  live      {report['live']['version']} (from {report['live']['origin']})",
        f"  candidate {report['candidate']['version']} (from {report['candidate']['origin']})",
        f"  features  {report['features']}",
        f"  scored by both: {report['compared']}; rejected by the live path: {sum(report['rejected'].values())}"
        f"{_counts(report['rejected'])}; scored by live only: {report['live_only']}",
    ]
    agreed = report["agreement"]
    if agreed["rate"] is None:
        lines.append("agreement: no classes to compare (a regressor)")
    else:
        rate, agree, compared = agreed["rate"], agreed["agree"], agreed["compared"]
        lines.append(f"agreement: {rate:.4f} ({agree} of {compared}), flips {agreed['flips']}")
        classes = sorted({c for row in agreed["confusion"].values() for c in row} | set(agreed["confusion"]))
        lines.append("  live \\ candidate " + " ".join(f"{c:>10}" for c in classes))
        for a in classes:
            row = agreed["confusion"].get(a, {})
            lines.append(f"  {a:>16} " + " ".join(f"{row.get(b, 0):>10}" for b in classes))
    deltas = report["score_delta"]
    if deltas["quantiles"]:
        shown = " ".join(f"{name} {_fmt(v)}" for name, v in deltas["quantiles"].items())
        lines.append(f"score delta (candidate - live): mean {_fmt(deltas['mean'])}; {shown}")
    latency = report["latency_ms_per_batch"]
    lines.append(f"latency per batch ({latency['batches']} batches of up to {latency['batch_size']}), ms:")
    for name in ("batch", "live_inference", "candidate_inference"):
        values = latency[name]
        if values:
            lines.append(f"  {name:<20} " + " ".join(f"{k} {_fmt(v)}" for k, v in values.items()))
    lines.append(_quality_line(report["quality"]))
    return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    return " (" + ", ".join(f"{reason} {n}" for reason, n in counts.items()) + ")" if counts else ""


def _quality_line(found: dict[str, Any]) -> str:
    if "note" in found:
        return f"quality: {found['note']}"
    parts = []
    for side in ("live", "candidate"):
        figures = found[side]
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items() if k != "labelled")
        parts.append(f"{side} {shown or '-'}")
    return f"quality on {found['live']['labelled']} labelled events ({found['labels_topic']}): " + "; ".join(parts)
