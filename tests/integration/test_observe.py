"""Metrics and health endpoints of a running worker."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from streamserve.demo.data import Entities, make_events
from tests.deploy.test_monitoring import BROKER_METRICS, exported_families, referenced_metrics
from tests.integration.harness import Pipeline, WorkerThread, predictions, produce_events, wait_until


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


def _lag(body: str) -> list[float]:
    return [float(v) for v in re.findall(r"streamserve_consumer_lag\{[^}]*\} (\S+)", body)]


def _count(body: str, histogram: str) -> float:
    found = re.search(rf"{histogram}_count(?:\{{[^}}]*\}})? (\S+)", body)
    return float(found.group(1)) if found else -1.0
