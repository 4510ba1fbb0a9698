"""The monitor's Prometheus metrics (served on ``monitor.port`` by observe.metrics.ObserveServer).

Gauges show, per model, version and role, the latest window reported: ``streamserve_quality`` only once the
version has ``monitor.min_labels`` labelled pairs in it (measured), ``streamserve_quality_estimated`` (CBPE) from
the first prediction. Counters count what the monitor did with each record; they restart at zero with the
process (Prometheus' rate() and increase() handle that); the quality topic holds the exact numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from streamserve.monitor.measures import CLASSIFIER_METRICS, REGRESSOR_METRICS

LAG_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 172800, 604800)
"""Label lag buckets, in seconds: a minute to a week."""
_VERSION = ("model", "version", "role")
_COMPARISON = ("model", "candidate", "baseline", "kind", "metric")
_VERDICTS = {"candidate better": 1, "baseline better": -1}


class QualityExporter:
    """Every instrument of the monitor."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self.quality = gauge("streamserve_quality", "measured quality of the latest window", (*_VERSION, "metric"))
        self.estimated = gauge(
            "streamserve_quality_estimated", "quality estimated from the probabilities (CBPE)", (*_VERSION, "metric")
        )
        self.pairs = gauge(
            "streamserve_quality_pairs", "predictions of the latest window by state", (*_VERSION, "state")
        )
        self.window = gauge("streamserve_quality_window_start_seconds", "start of the latest window shown", _VERSION)
        self.comparison = gauge(
            "streamserve_quality_comparison", "candidate minus live and its interval", (*_COMPARISON, "bound")
        )
        self.verdict = gauge(
            "streamserve_quality_comparison_verdict",
            "1 the candidate is better, -1 the live version is, 0 not yet distinguishable",
            _COMPARISON,
        )
        self.needed = gauge(
            "streamserve_quality_comparison_labels_needed",
            "labels still needed to tell the versions apart",
            _COMPARISON,
        )
        self.floor = gauge(
            "streamserve_quality_floor", "lowest acceptable quality (monitor.floors)", ("model", "metric")
        )
        self.ceiling = gauge(
            "streamserve_quality_ceiling", "highest acceptable loss or error (monitor.ceilings)", ("model", "metric")
        )
        self.labels = Counter("streamserve_monitor_labels", "label records by outcome", ("outcome",), registry=registry)
        self.predictions = Counter(
            "streamserve_monitor_predictions", "prediction records by outcome", ("outcome",), registry=registry
        )
        self.joined = Counter(
            "streamserve_monitor_pairs",
            "predictions joined with a label or never labelled",
            (*_VERSION, "outcome"),
            registry=registry,
        )
        self.lag = Histogram(
            "streamserve_label_lag_seconds",
            "label time minus event time of joined pairs",
            ("model",),
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "streamserve_monitor_failures", "records an agent could not process (logged)", ("step",), registry=registry
        )
        self.reports = Counter("streamserve_monitor_reports", "quality reports written", ("final",), registry=registry)
        self._shown: dict[tuple[str, str, str], int] = {}
        self._measured: dict[tuple[str, str, str], int] = {}

    def thresholds(self, model: str, floors: Mapping[Any, float], ceilings: Mapping[Any, float]) -> None:
        for metric, value in floors.items():
            self.floor.labels(model, metric).set(value)
        for metric, value in ceilings.items():
            self.ceiling.labels(model, metric).set(value)

    def forget(self) -> None:
        """Drop the quality gauges' series: this process no longer reports (another owns by-event partition 0 and
        shows the same windows; two processes must not both alert on a version's quality)."""
        shown = (self.quality, self.estimated, self.pairs, self.window, self.comparison, self.verdict, self.needed)
        for gauge in shown:
            gauge.clear()
        self._shown.clear()
        self._measured.clear()

    def update(self, report: Mapping[str, Any]) -> None:
        """Show a report's numbers where its window is the newest seen for the version."""
        model, start = report["model_name"], int(report["window_start"])
        self.reports.labels(str(report["final"]).lower()).inc()
        for v in report["versions"]:
            ident = (model, v["version"], v["role"])
            if start >= self._shown.get(ident, start):
                self._shown[ident] = start
                self.window.labels(*ident).set(start / 1000)
                for state in ("predictions", "labelled", "never_labelled", "pending", "late"):
                    self.pairs.labels(*ident, state).set(v[state])
                for name in ("accuracy", "precision", "recall", "f1"):
                    if v.get(f"estimated_{name}") is not None:
                        self.estimated.labels(*ident, name).set(v[f"estimated_{name}"])
            if v["status"] == "measured" and start >= self._measured.get(ident, start):
                self._measured[ident] = start
                for name in CLASSIFIER_METRICS + REGRESSOR_METRICS:
                    if v.get(name) is not None:
                        self.quality.labels(*ident, name).set(v[name])
        for c in report["comparisons"]:
            ident_c = (model, c["candidate"], c["baseline"], c["kind"], c["metric"])
            for bound in ("difference", "low", "high"):
                if c.get(bound) is not None:
                    self.comparison.labels(*ident_c, bound).set(c[bound])
            self.verdict.labels(*ident_c).set(_VERDICTS.get(c["verdict"], 0))
            self.needed.labels(*ident_c).set(c["labels_needed"] or 0)
