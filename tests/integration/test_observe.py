"""Metrics and health endpoints of a running worker."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from streamserve.demo.data import Entities, make_events
from tests.deploy.test_monitoring import (
    BROKER_METRICS,
    MODEL_LABELLED,
    TOPIC_LABELLED,
    exported_families,
    referenced_metrics,
)
from tests.integration.harness import Pipeline, WorkerThread, predictions, produce_events, wait_until
from tests.otlp import otlp_receiver, spans

OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
"""What Prometheus sends when exemplar storage is on."""


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


@pytest.mark.pipeline(**{"observe.port": 0, "observe.host": "127.0.0.1"})
def test_metrics_count_what_the_worker_did_and_probes_answer(pipeline: Pipeline, entities: Entities) -> None:
    worker = WorkerThread(pipeline.settings)
    try:
        server = worker.worker.observe_server
        assert server is not None
        wait_until(lambda: _get(server.port, "/readyz")[0] == 200, 30, "readiness after joining the group")
        assert _get(server.port, "/healthz") == (200, "ok\n")
        events = list(make_events(entities, 1500, seed=301))
        produce_events(pipeline, events)
        predictions(pipeline, len(events))
        wait_until(lambda: worker.worker.stats.events_in >= len(events), 30, "the worker's own count")
        wait_until(
            lambda: _lag(_get(server.port, "/metrics")[1]) == [0.0] * 4, 30, "consumer lag 0 on all 4 partitions"
        )
        wait_until(
            lambda: _count(_get(server.port, "/metrics")[1], "streamserve_record_latency_seconds") == len(events),
            30,
            "an end-to-end latency per acknowledged record",
        )
        status, body = _get(server.port, "/metrics")
        assert _get(server.port, "/nope")[0] == 404
    finally:
        worker.stop()
    assert status == 200
    predicted = re.search(r'streamserve_events_total\{[^}]*outcome="predicted"[^}]*\} (\S+)', body)
    assert predicted, body[:2000]
    assert float(predicted.group(1)) == len(events)
    batches = re.search(r"streamserve_batches_total\{[^}]*\} (\S+)", body)
    assert batches
    assert float(batches.group(1)) == worker.worker.stats.batches
    assert re.search(r'streamserve_model_serving\{[^}]*version="v1"[^}]*\} 1', body)
    assert "streamserve_batch_duration_seconds_bucket" in body
    for name in (
        "streamserve_redis_duration_seconds_count",
        "streamserve_batch_size_bucket",
        "# TYPE streamserve_feature_age_seconds histogram",  # the test pipeline stamps no feature: no sample
    ):
        assert name in body, name
    assert re.search(r'streamserve_inference_duration_seconds_count\{[^}]*version="v1"[^}]*\} [1-9]', body)
    # streamserve_drift_psi has a series only once a version with a reference profile scored a window: its export
    # is checked by tests/integration/test_drift.py. streamserve_broker_*: the lag exporter's (test_lagexport).
    from_workers = {name for name in referenced_metrics() if not name.startswith(BROKER_METRICS)}
    missing = from_workers - exported_families(body) - {"streamserve_drift_psi"}
    assert not missing, f"the dashboard or the alert rules query metrics the worker does not export: {missing}"
    assert re.search(r'streamserve_model_info\{[^}]*desired_version="v1"[^}]*serving_version="v1"[^}]*\} 1', body)
    # The dashboard's $topic and $model filter these families: their series must carry the label.
    for label, families in (("topic", TOPIC_LABELLED), ("model", MODEL_LABELLED)):
        for family in families & exported_families(body):
            series = re.findall(rf"^{family}\{{([^}}]*)\}}", body, re.MULTILINE)
            assert series, family
            assert all(f'{label}="' in labels for labels in series), f"{family} has series without {label}"


def _lag(body: str) -> list[float]:
    return [float(v) for v in re.findall(r"streamserve_consumer_lag\{[^}]*\} (\S+)", body)]


def _count(body: str, histogram: str) -> float:
    found = re.search(rf"{histogram}_count(?:\{{[^}}]*\}})? (\S+)", body)
    return float(found.group(1)) if found else -1.0


def _scrape(port: int, accept: str | None) -> tuple[str, str]:
    """/metrics with this Accept header: its content type and body."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_an_openmetrics_scrape_carries_the_exported_batch_traces_as_exemplars(
    pipeline_factory: Callable[..., Pipeline], entities: Entities
) -> None:
    with otlp_receiver() as (url, received):
        pipe = pipeline_factory(
            **{
                "observe.port": 0,
                "observe.host": "127.0.0.1",
                "observe.trace_sample_ratio": 1.0,
                "observe.otlp_endpoint": url,
                "batch.max_batch_size": 100,
            }
        )
        worker = WorkerThread(pipe.settings)
        try:
            server = worker.worker.observe_server
            assert server is not None
            wait_until(lambda: _get(server.port, "/readyz")[0] == 200, 30, "readiness after joining the group")
            events = list(make_events(entities, 800, seed=302))
            produce_events(pipe, events)
            predictions(pipe, len(events))
            wait_until(
                lambda: _count(_scrape(server.port, None)[1], "streamserve_record_latency_seconds") == len(events),
                30,
                "an end-to-end latency per acknowledged record",
            )
            plain_type, plain = _scrape(server.port, None)
            open_type, open_body = _scrape(server.port, OPENMETRICS)
        finally:
            worker.stop()  # flushes the batch spans to the receiver
        exported = spans(received)

    assert plain_type.startswith("text/plain"), plain_type
    assert " # {" not in plain, "the Prometheus text format has no exemplars"
    assert open_type.startswith("application/openmetrics-text"), open_type
    assert open_body.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(open_body)}
    batch_traces = {s.trace_id.hex() for s in exported if s.name == "streamserve.batch"}
    assert batch_traces, "the worker exported its batch spans"
    for histogram in ("streamserve_record_latency_seconds", "streamserve_batch_duration_seconds"):
        buckets = [s for s in families[histogram].samples if s.name.endswith("_bucket")]
        with_exemplar = [s for s in buckets if s.exemplar is not None]
        assert with_exemplar, f"{histogram}: no exemplar"
        bounds = [float(s.labels["le"]) for s in buckets]
        for sample in with_exemplar:
            assert sample.exemplar.labels["trace_id"] in batch_traces, f"{histogram}: not an exported batch's trace"
            upper = float(sample.labels["le"])
            lower = max([b for b in bounds if b < upper], default=float("-inf"))
            assert lower < sample.exemplar.value <= upper, f"{histogram}: exemplar outside its bucket"
    # Each batch's receive span (the polls that gathered it) is its parent, beside process and send.
    receives = {s.span_id: s for s in exported if s.name == "receive"}
    polled = [s for s in exported if s.name == "streamserve.batch" and s.parent_span_id]
    assert polled, "a receive span per polled batch"
    for batch in polled:
        receive = receives[batch.parent_span_id]
        assert receive.kind == SpanProto.SPAN_KIND_CLIENT
        attributes = {a.key: a.value for a in receive.attributes}
        assert attributes["messaging.operation.type"].string_value == "receive"
        assert attributes["messaging.destination.name"].string_value == pipe.settings.input.topic
        assert receive.start_time_unix_nano <= receive.end_time_unix_nano <= batch.start_time_unix_nano
