"""Histograms filled a batch at a time with numpy, exported in Prometheus format.

OpenTelemetry's ``Histogram.record`` costs ~18 us per value on this machine: per input record that would cost
more than scoring it. Per-record distributions (end-to-end latency, feature age) are therefore bucketed here
with one ``np.searchsorted`` per batch and exposed through prometheus_client on the same /metrics page.

An observation may carry an exemplar, the trace id of the batch it measured: kept for the bucket of the batch's
largest value (one per batch, never per record), and served when the scraper asks for OpenMetrics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from prometheus_client.core import Exemplar, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AGE_SECONDS_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0)


class BatchHistogram:
    """Cumulative bucket counts, sum and count per label set, updated with whole arrays."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], tuple[np.ndarray, list[float]]] = {}
        self._exemplars: dict[tuple[str, ...], list[Exemplar | None]] = {}
        """Per label set, the latest exemplar of each bucket (the +Inf slot last)."""
        self._lock = threading.Lock()

    def observe(
        self, values: np.ndarray | Iterable[float], labels: Sequence[str] = (), trace_id: str | None = None
    ) -> None:
        """Add every value of the array; with `trace_id` (32 hex digits), the largest value becomes its bucket's
        exemplar."""
        array = np.asarray(values, dtype=np.float64)
        if not array.size:
            return
        # bucket i counts values <= bounds[i]; the last slot is +Inf
        slots = np.searchsorted(self.bounds, array, side="left")
        counts = np.bincount(slots, minlength=len(self.bounds) + 1)
        key = tuple(labels)
        with self._lock:
            buckets, totals = self._series.setdefault(key, (np.zeros(len(self.bounds) + 1, dtype=np.int64), [0.0, 0.0]))
            buckets += counts
            totals[0] += float(array.sum())
            totals[1] += float(array.size)
            if trace_id is not None:
                largest = int(array.argmax())
                exemplars = self._exemplars.setdefault(key, [None] * (len(self.bounds) + 1))
                exemplars[int(slots[largest])] = Exemplar({"trace_id": trace_id}, float(array[largest]), time.time())

    def count(self, labels: Sequence[str] = ()) -> int:
        """Values observed so far for a label set."""
        with self._lock:
            series = self._series.get(tuple(labels))
            return int(series[1][1]) if series else 0

    def family(self) -> HistogramMetricFamily:
        """The Prometheus metric family of every label set."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labels, (buckets, (total, _)) in self._series.items():
                cumulative = np.cumsum(buckets)
                bounds = [*(_le(bound) for bound in self.bounds), "+Inf"]
                exemplars = self._exemplars.get(labels)
                rows: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
                for slot, (bound, count) in enumerate(zip(bounds, cumulative, strict=True)):
                    exemplar = exemplars[slot] if exemplars is not None else None
                    rows.append((bound, float(count)) if exemplar is None else (bound, float(count), exemplar))
                family.add_metric(list(labels), rows, total)
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


class BatchHistograms(Collector):
    """A prometheus_client collector over a set of :class:`BatchHistogram`."""

    def __init__(self, histograms: Iterable[BatchHistogram]) -> None:
        self.histograms = list(histograms)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        for histogram in self.histograms:
            yield histogram.family()
