"""A window's quality report per model: versions and their roles, measures, estimates, comparisons; its Avro
record (``schemas/quality_report.avsc``) and the table ``streamserve models quality`` prints.

Roles come from the predictions themselves: the shadow topic's versions are ``shadow``; on the main topic the
version that scored the most events of the window is ``live`` and any other is a ``canary``. A shadow version
is compared with the live one on the events both scored (paired), a canary on its events against the live
version's (unpaired).
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import fastavro
import numpy as np

from streamserve.monitor.compare import Comparison, Regressed, Sample, compare
from streamserve.monitor.estimate import ESTIMATED_METRICS, estimated
from streamserve.monitor.measures import (
    CLASSIFIER_METRICS,
    REGRESSOR_METRICS,
    Classified,
    classified,
    classifier_metrics,
    per_class,
    regressor_metrics,
)
from streamserve.schemas import bundled

_SCHEMA = bundled("quality_report")
Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class ReportSettings:
    task: Task
    positive_class: str | None
    min_labels: int = 100
    confidence: float = 0.95
    bootstrap_samples: int = 1000
    compare_metric: str = "auto"


@dataclass(slots=True)
class _Pair:
    event: str
    predicted: str | None
    score: float
    probabilities: dict[str, float] | None
    label: Any
    label_time: int | None
    expired: bool
    time: int


@dataclass
class _Version:
    model: str
    version: str
    topic_role: str
    pairs: list[_Pair]

    def labelled(self) -> list[_Pair]:
        return [p for p in self.pairs if p.label is not None]


def _group(entries: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[tuple[str, str, str], _Version]:
    groups: dict[tuple[str, str, str], _Version] = {}
    for key, entry in entries:
        for prediction in entry["s"].values():
            ident = (prediction["m"], prediction["r"], prediction["v"])
            group = groups.setdefault(ident, _Version(prediction["m"], prediction["v"], prediction["r"], []))
            group.pairs.append(
                _Pair(
                    key,
                    prediction.get("c"),
                    float(prediction["s"]),
                    prediction.get("pr"),
                    entry.get("y"),
                    entry.get("lt"),
                    bool(entry.get("x")),
                    int(entry["t"]),
                )
            )
    return groups


def _sample(pairs: list[_Pair], settings: ReportSettings) -> Sample:
    if settings.task == "regression":
        return Regressed(
            np.array([float(p.label) for p in pairs], dtype=np.float64),
            np.array([p.score for p in pairs], dtype=np.float64),
        )
    return classified(
        [str(p.label) for p in pairs],
        [p.predicted if p.predicted is not None else "" for p in pairs],
        [p.score for p in pairs],
        [p.probabilities for p in pairs],
        settings.positive_class,
    )


def _estimates(pairs: list[_Pair], settings: ReportSettings) -> dict[str, float | None]:
    if settings.task == "regression" or not pairs:
        return {}
    predicted = [p.predicted if p.predicted is not None else "" for p in pairs]
    c = classified(
        predicted, predicted, [p.score for p in pairs], [p.probabilities for p in pairs], settings.positive_class
    )
    return estimated(c.proba, c.y_pred, c.positive)


def _version_record(group: _Version, role: str, window_end: int, settings: ReportSettings) -> dict[str, Any]:
    labelled = group.labelled()
    never = sum(1 for p in group.pairs if p.label is None and p.expired)
    record: dict[str, Any] = {
        "version": group.version,
        "role": role,
        "task": settings.task,
        "predictions": len(group.pairs),
        "labelled": len(labelled),
        "never_labelled": never,
        "pending": len(group.pairs) - len(labelled) - never,
        "late": sum(1 for p in labelled if p.label_time is not None and p.label_time >= window_end),
        "status": "measured" if len(labelled) >= settings.min_labels else "estimated",
        "label_lag_p50_s": statistics.median([(p.label_time or 0) - p.time for p in labelled]) / 1000
        if labelled
        else None,
        "classes": [],
        **dict.fromkeys(CLASSIFIER_METRICS + REGRESSOR_METRICS),
        **{f"estimated_{name}": None for name in ESTIMATED_METRICS},
    }
    sample = _sample(labelled, settings)
    if isinstance(sample, Regressed):
        record.update(regressor_metrics(sample.true, sample.predicted))
    else:
        record.update(classifier_metrics(sample))
        if len(sample):
            precision, recall, f1, support = per_class(sample)
            record["classes"] = [
                {"name": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                for name, p, r, f, s in zip(sample.classes, precision, recall, f1, support, strict=True)
            ]
    for name, value in _estimates(group.pairs, settings).items():
        record[f"estimated_{name}"] = value
    return record


def comparison_metric(settings: ReportSettings, sample: Sample) -> str:
    """The measure comparisons use: the configured one, else ROC AUC (binary), accuracy (more classes), MAE."""
    if settings.compare_metric != "auto":
        return settings.compare_metric
    if isinstance(sample, Regressed):
        return "mae"
    return "roc_auc" if isinstance(sample, Classified) and sample.binary else "accuracy"


def _comparisons(live: _Version, others: list[tuple[_Version, str]], settings: ReportSettings) -> list[Comparison]:
    found = []
    base_labelled = live.labelled()
    base_by_event = {p.event: p for p in base_labelled}
    for group, role in others:
        names = (f"{group.version} ({role})", f"{live.version} (live)")
        if role == "shadow":
            mine = [p for p in group.labelled() if p.event in base_by_event]
            theirs = [base_by_event[p.event] for p in mine]
            candidate, baseline = _sample(mine, settings), _sample(theirs, settings)
            paired = True
        else:
            candidate, baseline = _sample(group.labelled(), settings), _sample(base_labelled, settings)
            paired = False
        metric = comparison_metric(settings, baseline if len(baseline) else candidate)
        found.append(
            compare(
                metric,
                names,
                candidate,
                baseline,
                paired,
                confidence=settings.confidence,
                samples=settings.bootstrap_samples,
                min_labels=settings.min_labels,
            )
        )
    return found


def window_reports(
    window_start: int,
    window_ms: int,
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    settings: ReportSettings,
    final: bool,
    now_ms: int,
) -> list[dict[str, Any]]:
    """One report per model over the window's entries (key, entry), as records of the Avro schema."""
    window_end = window_start + window_ms
    by_model: dict[str, list[_Version]] = {}
    for group in _group(entries).values():
        by_model.setdefault(group.model, []).append(group)
    reports = []
    for model, groups in sorted(by_model.items()):
        main = sorted((g for g in groups if g.topic_role == "main"), key=lambda g: (-len(g.pairs), g.version))
        roles = [(g, "live" if i == 0 else "canary") for i, g in enumerate(main)]
        roles += [(g, "shadow") for g in sorted(groups, key=lambda g: g.version) if g.topic_role == "shadow"]
        comparisons = _comparisons(main[0], roles[1:], settings) if main else []
        reports.append(
            {
                "model_name": model,
                "window_start": window_start,
                "window_end": window_end,
                "final": final,
                "computed_at": now_ms,
                "versions": [_version_record(g, role, window_end, settings) for g, role in roles],
                "comparisons": [asdict(c) for c in comparisons],
            }
        )
    return reports


def report_key(report: Mapping[str, Any]) -> str:
    return f"{report['model_name']}|{report['window_start']}"


def encode(report: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, _SCHEMA, dict(report))
    return buffer.getvalue()


def decode(data: bytes) -> dict[str, Any]:
    from streamserve.monitor.labels import millis

    record: dict[str, Any] = fastavro.schemaless_reader(io.BytesIO(data), _SCHEMA, None)  # type: ignore[assignment]
    for name in ("window_start", "window_end", "computed_at"):
        record[name] = millis(record[name])
    return record


def latest(records: Iterable[tuple[bytes | None, bytes | None]]) -> list[dict[str, Any]]:
    """The newest window's report of each model on the quality topic (undecodable records skipped)."""
    newest: dict[str, dict[str, Any]] = {}
    for _, value in records:
        if not value:
            continue
        try:
            report = decode(value)
        except Exception:  # noqa: BLE001 - another writer's record on the topic is not ours to show
            continue
        known = newest.get(report["model_name"])
        if known is None or (report["window_start"], report["computed_at"]) >= (
            known["window_start"],
            known["computed_at"],
        ):
            newest[report["model_name"]] = report
    return [newest[name] for name in sorted(newest)]


def _number(value: float | None, width: int = 7) -> str:
    return f"{value:>{width}.4f}" if value is not None else f"{'-':>{width}}"


def _time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def format_report(report: Mapping[str, Any]) -> list[str]:
    """The terminal table of one report: a row per version, then a line per comparison."""
    state = "final" if report["final"] else "open"
    lines = [
        f"{report['model_name']}  window {_time(report['window_start'])} - {_time(report['window_end'])} UTC ({state})"
    ]
    regression = any(v["task"] == "regression" for v in report["versions"])
    measures = (
        ("mae", "rmse") if regression else ("accuracy", "precision", "recall", "f1", "roc_auc", "log_loss", "brier")
    )
    heads = ("MAE", "RMSE") if regression else ("ACC", "PREC", "RECALL", "F1", "AUC", "LOGLOSS", "BRIER")
    estimates = () if regression else ("accuracy", "f1")
    header = f"  {'VERSION':<10} {'ROLE':<7} {'PREDS':>7} {'LABELLED':>8} {'NEVER':>6} {'PENDING':>7} {'LATE':>6}"
    header += f" {'STATUS':<9}"
    header += "".join(f" {h:>7}" for h in heads)
    header += "".join(f" {'EST ' + ('ACC' if e == 'accuracy' else 'F1'):>7}" for e in estimates)
    lines.append(header)
    for v in report["versions"]:
        row = f"  {v['version']:<10} {v['role']:<7} {v['predictions']:>7} {v['labelled']:>8} {v['never_labelled']:>6}"
        row += f" {v['pending']:>7} {v['late']:>6} {v['status']:<9}"
        row += "".join(" " + _number(v.get(m)) for m in measures)
        row += "".join(" " + _number(v.get(f"estimated_{e}")) for e in estimates)
        lines.append(row)
    for c in report["comparisons"]:
        lines.append("  " + describe(c))
    return lines


def describe(c: Mapping[str, Any]) -> str:
    """One comparison as a sentence."""
    text = f"{c['candidate']} vs {c['baseline']}, {c['kind']}, {c['metric']}"
    if c.get("difference") is not None:
        text += f": {c['difference']:+.4f}"
    if c.get("low") is not None and c.get("high") is not None:
        text += f" [{c['low']:+.4f}, {c['high']:+.4f}] {c['confidence']:.0%} ({c['method']})"
    text += f", n={c['n_candidate']}/{c['n_baseline']} -> "
    if c.get("better"):
        return text + f"{c['better']} is better"
    needed = c.get("labels_needed")
    return text + "not yet distinguishable" + (f" (about {needed:,} more labels)" if needed else "")
