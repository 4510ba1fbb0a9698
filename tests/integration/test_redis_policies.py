"""What a worker does when Redis cannot be reached: dead-letter the batch, or score with defaults, flagged."""

from __future__ import annotations

import socket
from collections.abc import Callable

import numpy as np

from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from tests.integration.harness import (
    Pipeline,
    WorkerThread,
    headers_of,
    offline_scores,
    predictions,
    produce_events,
    read_topic,
)


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there once the socket is closed


def test_unreachable_redis_routes_batches_to_the_dead_letter_topic(
    pipeline_factory: Callable[..., Pipeline], entities: Entities
) -> None:
    pipeline = pipeline_factory(redis={"url": _closed_port_url(), "retries": 2, "backoff_ms": 10})
    events = list(make_events(entities, 300, seed=201))
    worker = WorkerThread(pipeline.settings)
    try:
        produce_events(pipeline, events)
        dead = read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, len(events))
    finally:
        worker.stop()
    assert len(dead) == len(events)
    for msg in dead:
        headers = headers_of(msg)
        assert headers["streamserve.dlq.stage"] == b"enrich"
        assert b"Redis unavailable after 3 attempts" in headers["streamserve.dlq.error.message"]
    assert worker.worker.stats.predictions_out == 0


def test_defaults_policy_scores_with_feature_defaults_and_flags_predictions(
    pipeline_factory: Callable[..., Pipeline], entities: Entities, models: dict[str, TrainedModel]
) -> None:
    pipeline = pipeline_factory(redis={"url": _closed_port_url(), "retries": 0, "on_error": "defaults"})
    specs = pipeline.settings.features
    events = list(make_events(entities, 300, seed=202))
    worker = WorkerThread(pipeline.settings)
    try:
        produce_events(pipeline, events)
        dead = read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, len(events))
    finally:
        worker.stop()
    # merchant_risk has no default in the test pipeline: without Redis those events cannot be scored.
    assert next(s for s in specs if s.name == "merchant_risk").default is None
    assert len(dead) == len(events)
    assert all(b"'merchant_risk'" in headers_of(m)["streamserve.dlq.error.message"] for m in dead)

    with_default = pipeline_factory(
        redis={"url": _closed_port_url(), "retries": 0, "on_error": "defaults"},
        features=[
            {**s.model_dump(exclude_none=True), **({"default": 0.5} if s.name == "merchant_risk" else {})}
            for s in specs
        ],
    )
    worker = WorkerThread(with_default.settings)
    try:
        produce_events(with_default, events)
        outputs = predictions(with_default, len(events))
    finally:
        worker.stop()
    records = {r["event_id"]: r for _, r in outputs}
    assert all(r["degraded"] for r in records.values())
    matrix = np.array(
        [[e["amount"], e["hour_of_day"], float(e["is_online"]), 50.0, 0.0, 0.0, 0.5] for e in events], dtype=np.float32
    )
    expected, _ = offline_scores(models["v1"], matrix)
    got = np.array([records[e["event_id"]]["score"] for e in events])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert worker.worker.stats.degraded_predictions == len(events)
