"""The main job against the real broker and Redis: every event predicted, correctly, in order."""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import fastavro
import numpy as np
import pytest
import redis
from confluent_kafka import Producer

from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.pipeline.decode import load_schema
from tests.integration.harness import (
    Pipeline,
    WorkerThread,
    headers_of,
    offline_features,
    offline_scores,
    predictions,
    produce_events,
    read_topic,
)


@pytest.fixture
def worker(pipeline: Pipeline) -> Iterator[WorkerThread]:
    running = WorkerThread(pipeline.settings)
    yield running
    running.stop()


def test_20k_events_4_partitions_all_predicted_exactly_like_offline_onnxruntime(
    pipeline: Pipeline,
    worker: WorkerThread,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
) -> None:
    events = list(make_events(entities, 20_000, seed=5))
    produce_events(pipeline, events)
    outputs = predictions(pipeline, 20_000)

    assert len(outputs) == 20_000, "exactly one prediction per event"
    by_id = {record["event_id"]: record for _, record in outputs}
    assert set(by_id) == {e["event_id"] for e in events}

    expected_scores, expected_labels = offline_scores(
        models["v1"], offline_features(events, redis_client, pipeline.prefix)
    )
    got = np.array([by_id[e["event_id"]]["score"] for e in events])
    np.testing.assert_allclose(got, expected_scores, rtol=0, atol=1e-5)
    assert [by_id[e["event_id"]]["label"] for e in events] == expected_labels.tolist()

    # Stamped with the version (in the value, and in the one header output.headers has by default); the value
    # points back at the source record.
    input_partitions = set()
    for msg, record in outputs:
        assert record["model_version"] == "v1"
        assert headers_of(msg) == {"streamserve.model.version": b"v1"}
        assert msg.key().decode() == record["key"]
        input_partitions.add(record["source_partition"])
    assert input_partitions == {0, 1, 2, 3}

    # Per-key (hence per-partition) order: predictions of a key come out in the order its events went in.
    produced_order: dict[str, list[str]] = defaultdict(list)
    for e in events:
        produced_order[e["card_id"]].append(e["event_id"])
    output_order: dict[str, list[str]] = defaultdict(list)
    source_offsets: dict[int, list[int]] = defaultdict(list)
    for msg, record in outputs:  # read_topic returns each output partition in offset order
        output_order[record["key"]].append(record["event_id"])
        source_offsets[msg.partition() * 100 + record["source_partition"]].append(record["source_offset"])
    assert output_order == produced_order
    assert all(offsets == sorted(offsets) for offsets in source_offsets.values())


@pytest.mark.pipeline(**{"batch.max_batch_size": 256})
def test_a_backlog_sends_each_batchs_lookup_ahead_once_and_scores_like_offline_onnxruntime(
    pipeline: Pipeline, models: dict[str, TrainedModel], entities: Entities, redis_client: redis.Redis
) -> None:
    """With a backlog the next batch's Redis lookup goes out while the current batch is scored: every batch is
    still fetched exactly once (one EVALSHA per key template) and scores exactly as offline."""
    events = list(make_events(entities, 5_000, seed=9))
    produce_events(pipeline, events)  # before the worker starts: a backlog
    before = int(redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
    running = WorkerThread(pipeline.settings)
    try:
        outputs = predictions(pipeline, 5_000)
    finally:
        running.stop()
    stats = running.worker.stats
    evalsha = int(redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)) - before
    assert stats.batches_ahead >= stats.batches // 2, f"{stats.batches_ahead} of {stats.batches} batches sent ahead"
    assert evalsha == 2 * stats.batches, "one EVALSHA per key template (card, merchant) and batch, never two"
    assert len(outputs) == 5_000
    by_id = {record["event_id"]: record for _, record in outputs}
    expected_scores, _ = offline_scores(models["v1"], offline_features(events, redis_client, pipeline.prefix))
    np.testing.assert_allclose([by_id[e["event_id"]]["score"] for e in events], expected_scores, rtol=0, atol=1e-5)


def _avro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


@pytest.mark.pipeline(**{"output.headers": ["source_partition", "source_offset", "model_version"]})
def test_bad_input_goes_to_the_dead_letter_topic_and_the_worker_keeps_going(
    pipeline: Pipeline,
    worker: WorkerThread,
    entities: Entities,
) -> None:
    schema = load_schema(pipeline.settings.input.schema_path)
    rng = np.random.default_rng(99)
    good = list(make_events(entities, 1000, seed=6))
    template = good[0]
    other_schema = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Click",
            "fields": [
                {"name": "url", "type": "string"},
                {"name": "ms", "type": "long"},
                {"name": "ua", "type": "string"},
            ],
        }
    )
    bad: list[tuple[bytes, str]] = []  # (value, expected stage)
    for i in range(10):
        bad.append((rng.bytes(int(rng.integers(20, 60))), "decode"))
        full = _avro(schema, {**template, "event_id": f"trunc-{i}"})
        bad.append((full[: len(full) // 2], "decode"))
        bad.append(
            (_avro(other_schema, {"url": "https://example.invalid/" + "x" * 30, "ms": i, "ua": "agent"}), "decode")
        )
        bad.append((_avro(schema, {**template, "event_id": f"nan-{i}", "amount": math.nan}), "features"))
        bad.append(
            (_avro(schema, {**template, "event_id": f"nomerchant-{i}", "merchant_id": "merchant-gone"}), "features")
        )

    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    topic = pipeline.settings.input.topic
    for i, event in enumerate(good):
        producer.produce(topic, _avro(schema, event), event["card_id"].encode())
        if i % 20 == 0 and bad:
            value, stage = bad[(i // 20) % len(bad)]
            producer.produce(topic, value, f"bad-{i}".encode(), headers=[("expect", stage.encode())])
    for value, stage in bad[len(good) // 20 :]:
        producer.produce(topic, value, b"bad-tail", headers=[("expect", stage.encode())])
    assert producer.flush(30) == 0
    n_bad = len(bad)

    dead = read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, n_bad)
    outputs = predictions(pipeline, len(good))
    assert len(dead) == n_bad
    assert sorted(record["event_id"] for _, record in outputs) == sorted(e["event_id"] for e in good)
    for msg, record in outputs:  # the headers output.headers asks for, as a worker built from the YAML sends them
        assert headers_of(msg) == {
            "streamserve.model.version": b"v1",
            "streamserve.source.partition": str(record["source_partition"]).encode(),
            "streamserve.source.offset": str(record["source_offset"]).encode(),
        }
    assert sorted(msg.value() for msg in dead) == sorted(value for value, _ in bad), "original bytes kept"
    for msg in dead:
        headers = headers_of(msg)
        assert headers["streamserve.dlq.stage"] == headers["expect"], headers
        assert headers["streamserve.dlq.source.topic"] == topic.encode()
        assert int(headers["streamserve.dlq.source.offset"]) >= 0
        assert headers["streamserve.dlq.error.message"]
    reasons = [headers_of(m)["streamserve.dlq.error.message"].decode() for m in dead]
    assert sum("'amount'" in r for r in reasons) == 10
    assert sum("'merchant_risk'" in r for r in reasons) == 10

    # Still serving after all of that.
    more = list(make_events(entities, 200, seed=7))
    produce_events(pipeline, more)
    later = predictions(pipeline, len(good) + len(more))
    assert {e["event_id"] for e in more} <= {record["event_id"] for _, record in later}
    assert worker.thread.is_alive()
    assert worker.worker.stats.dead_letters == n_bad
