"""Exemplars of the batch histograms: one per batch, on the bucket of its largest value, served as OpenMetrics."""

from __future__ import annotations

import numpy as np
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from streamserve.observe.histogram import BatchHistogram, BatchHistograms

TRACE_A, TRACE_B = "0af7651916cd43dd8448eb211c80319c", "4bf92f3577b34da6a3ce929d0e0e4736"


def _scrape(histogram: BatchHistogram) -> tuple[str, str]:
    registry = CollectorRegistry()
    registry.register(BatchHistograms([histogram]))
    return generate_latest(registry).decode(), openmetrics_latest(registry).decode()


def test_the_largest_value_of_a_traced_batch_is_its_buckets_exemplar() -> None:
    histogram = BatchHistogram("streamserve_test_seconds", "test", (0.1, 1.0, 10.0))
    histogram.observe(np.array([0.05, 0.5, 3.0, 0.2]), trace_id=TRACE_A)
    histogram.observe(np.array([0.01, 0.02]))  # untraced: counted, no exemplar
    histogram.observe(np.array([0.07, 0.08]), trace_id=TRACE_B)
    text, openmetrics = _scrape(histogram)

    assert " # {" not in text
    (family,) = text_string_to_metric_families(openmetrics)
    buckets = {s.labels["le"]: s for s in family.samples if s.name.endswith("_bucket")}
    assert [buckets[le].value for le in ("0.1", "1.0", "10.0", "+Inf")] == [5, 7, 8, 8]
    exemplars = {le: s.exemplar for le, s in buckets.items() if s.exemplar is not None}
    assert set(exemplars) == {"10.0", "0.1"}
    assert (exemplars["10.0"].labels["trace_id"], exemplars["10.0"].value) == (TRACE_A, 3.0)
    assert (exemplars["0.1"].labels["trace_id"], exemplars["0.1"].value) == (TRACE_B, 0.08)


def test_a_labelled_histogram_keeps_exemplars_per_label_set() -> None:
    histogram = BatchHistogram("streamserve_test_age_seconds", "test", (1.0, 10.0), ["field"])
    histogram.observe([0.5], ["a"], trace_id=TRACE_A)
    histogram.observe([5.0], ["b"])
    _, openmetrics = _scrape(histogram)
    (family,) = text_string_to_metric_families(openmetrics)
    traced = [(s.labels["field"], s.labels["le"]) for s in family.samples if s.exemplar is not None]
    assert traced == [("a", "1.0")]
