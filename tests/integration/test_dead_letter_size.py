"""Records near the size limits: their dead letters never stop a worker (issue 10).

A 999,800-byte value is accepted by the broker, but its dead letter (the value plus the original headers
plus ours) is not: it must be dead-lettered as a reference (sha256, size, source coordinates) instead of
crashing the worker, under both delivery guarantees, and again after a restart.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from streamserve.demo.data import Entities, make_events
from streamserve.errors import RecordTooLarge
from streamserve.pipeline.deadletter import (
    HEADER_KIP1034_EXCEPTION,
    HEADER_KIP1034_MESSAGE,
    HEADER_KIP1034_OFFSET,
    HEADER_KIP1034_PARTITION,
    HEADER_KIP1034_STACKTRACE,
    HEADER_KIP1034_TOPIC,
    HEADER_STAGE,
    HEADER_VALUE_REPLACED,
)
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from streamserve.pipeline.limits import (
    DEFAULT_MESSAGE_MAX_BYTES,
    SIZE_MARGIN_BYTES,
    size_limits,
    topic_max_message_bytes,
)
from streamserve.pipeline.sink import InflightBatch, OutputSink
from tests.integration.harness import (
    Pipeline,
    WorkerProcess,
    headers_of,
    produce_events,
    read_topic,
    unique,
    wait_until,
)

HUGE = 999_800
"""Fits the input producer's default message.max.bytes (1,000,000); its dead letter cannot."""
BIG = 990_000
"""Close to the limit, but its dead letter fits: it keeps its original bytes."""


def _group_lag(pipeline: Pipeline) -> int:
    """Messages of the input topic not yet covered by the worker group's committed offsets."""
    topic = pipeline.settings.input.topic
    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": pipeline.settings.kafka.group_id})
    try:
        partitions = [TopicPartition(topic, p) for p in range(pipeline.partitions)]
        lag = 0
        for tp in consumer.committed(partitions, timeout=10):
            high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
            lag += high - max(tp.offset, 0)
        return lag
    finally:
        consumer.close()


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_a_dead_letter_over_the_size_limit_becomes_a_reference_and_the_worker_survives(
    mode: str, pipeline_factory: Callable[..., Pipeline], entities: Entities, tmp_path: Path
) -> None:
    pipeline = pipeline_factory(partitions=2, delivery=mode)
    isolation = "read_committed" if mode == "exactly_once" else "read_uncommitted"
    rng = np.random.default_rng(10)
    huge, big = rng.bytes(HUGE), rng.bytes(BIG)
    before = list(make_events(entities, 300, seed=21))
    after = list(make_events(entities, 300, seed=22))

    produce_events(pipeline, before)
    producer = Producer({"bootstrap.servers": pipeline.bootstrap})
    topic = pipeline.settings.input.topic
    producer.produce(topic, huge, b"huge", headers=[("origin", b"upstream-a")])
    producer.produce(topic, big, b"big", headers=[("origin", b"upstream-b")])
    assert producer.flush(30) == 0, "the broker refused the input records"
    produce_events(pipeline, after)
    events = before + after

    worker = WorkerProcess(pipeline.path, tmp_path, unique("w"))
    worker.wait_logged(" serving ")
    wait_until(lambda: worker.assert_alive() or _group_lag(pipeline) == 0, 90, "the group's lag to reach 0")
    dead = read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, 2, isolation=isolation)
    outputs = read_topic(pipeline.bootstrap, pipeline.settings.output.topic, len(events), isolation=isolation)
    worker.assert_alive()

    assert len(dead) == 2, [m.key() for m in dead]
    assert len(outputs) == len(events)
    by_key = {m.key(): m for m in dead}
    assert set(by_key) == {b"huge", b"big"}

    # The huge one: a small JSON reference instead of the value, with the reason; checked independently.
    referenced = by_key[b"huge"]
    headers = headers_of(referenced)
    assert headers[HEADER_VALUE_REPLACED] == b"reference"
    assert len(referenced.value()) < 4096
    reference = json.loads(referenced.value())
    assert reference["value"] == {"size": HUGE, "sha256": hashlib.sha256(huge).hexdigest()}
    assert reference["source"]["topic"] == topic
    assert reference["source"]["partition"] == int(headers[HEADER_KIP1034_PARTITION])
    assert reference["source"]["offset"] == int(headers[HEADER_KIP1034_OFFSET])
    assert "exceeds" in reference["reason"]
    assert headers["origin"] == b"upstream-a", "the original headers are kept"

    # The big one still fits: its original bytes, untouched.
    kept = by_key[b"big"]
    assert kept.value() == big
    assert HEADER_VALUE_REPLACED not in headers_of(kept)
    assert headers_of(kept)["origin"] == b"upstream-b"

    for msg in dead:
        h = headers_of(msg)
        assert h[HEADER_STAGE] == b"decode"
        assert h["streamserve.dlq.stage"] == b"decode"
        assert h[HEADER_KIP1034_TOPIC] == topic.encode()
        assert int(h[HEADER_KIP1034_PARTITION]) in range(pipeline.partitions)
        assert int(h[HEADER_KIP1034_OFFSET]) >= 0
        assert h[HEADER_KIP1034_EXCEPTION] == b"DecodeError"
        assert h[HEADER_KIP1034_MESSAGE]
        assert b"DecodeError" in h[HEADER_KIP1034_STACKTRACE]
        assert h[HEADER_KIP1034_MESSAGE] == h["streamserve.dlq.error.message"]
        size = len(msg.key()) + len(msg.value()) + sum(len(k) + len(v or b"") for k, v in msg.headers() or [])
        assert size <= DEFAULT_MESSAGE_MAX_BYTES

    schema = load_schema(pipeline.settings.output.schema_path)
    predicted = sorted(decode_prediction(schema, m.value())["event_id"] for m in outputs)
    assert predicted == sorted(e["event_id"] for e in events), "every other event predicted, once"
    assert worker.stop() == 0, worker.log_tail()

    # Restarted, nothing fails again: the big records are behind the committed offsets.
    restarted = WorkerProcess(pipeline.path, tmp_path, unique("w"))
    restarted.wait_logged(" serving ")
    more = list(make_events(entities, 100, seed=23))
    produce_events(pipeline, more)
    read_topic(pipeline.bootstrap, pipeline.settings.output.topic, len(events) + len(more), isolation=isolation)
    wait_until(lambda: restarted.assert_alive() or _group_lag(pipeline) == 0, 60, "the group's lag to reach 0")
    assert restarted.stop() == 0, restarted.log_tail()
    assert len(read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, 2, isolation=isolation)) == 2


def _limit_topic(bootstrap: str, topic: str, max_message_bytes: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry("max.message.bytes", str(max_message_bytes), incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)
    wait_until(
        lambda: topic_max_message_bytes({"bootstrap.servers": bootstrap}, [topic]).get(topic) == max_message_bytes,
        30,
        f"max.message.bytes={max_message_bytes} on {topic}",
    )


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_a_dead_letter_topic_limit_below_the_producers_is_read_at_start_and_never_exceeded(
    mode: str, pipeline_factory: Callable[..., Pipeline], entities: Entities, tmp_path: Path
) -> None:
    pipeline = pipeline_factory(partitions=2, delivery=mode)
    dlq = pipeline.settings.output.dead_letter_topic
    _limit_topic(pipeline.bootstrap, dlq, 100_000)
    isolation = "read_committed" if mode == "exactly_once" else "read_uncommitted"
    rng = np.random.default_rng(11)
    over, under = rng.bytes(150_000), rng.bytes(60_000)
    small = [rng.bytes(1000) for _ in range(400)]  # 400 KB together: more than one batch may hold
    events = list(make_events(entities, 200, seed=24))

    producer = Producer({"bootstrap.servers": pipeline.bootstrap, "linger.ms": 50})
    topic = pipeline.settings.input.topic
    producer.produce(topic, over, b"over")
    producer.produce(topic, under, b"under")
    for value in small:
        producer.produce(topic, value, b"small")
    assert producer.flush(30) == 0
    produce_events(pipeline, events)

    worker = WorkerProcess(pipeline.path, tmp_path, unique("w"))
    worker.wait_logged(" serving ")
    wait_until(lambda: worker.assert_alive() or _group_lag(pipeline) == 0, 90, "the group's lag to reach 0")
    dead = read_topic(pipeline.bootstrap, dlq, 402, isolation=isolation)
    outputs = read_topic(pipeline.bootstrap, pipeline.settings.output.topic, len(events), isolation=isolation)
    assert worker.stop() == 0, worker.log_tail()

    assert len(dead) == 402
    assert len(outputs) == len(events)
    by_key: dict[bytes, list[bytes]] = {}
    for msg in dead:
        by_key.setdefault(msg.key(), []).append(msg.value())
    assert sorted(by_key[b"small"]) == sorted(small), "small dead letters keep their bytes"
    assert by_key[b"under"] == [under]
    [reference] = (json.loads(value) for value in by_key[b"over"])
    assert reference["value"] == {"size": len(over), "sha256": hashlib.sha256(over).hexdigest()}
    assert "exceeds" in reference["reason"]


def test_the_sink_refuses_a_record_over_its_topics_limit_synchronously(
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    pipeline = pipeline_factory(partitions=1)
    out = pipeline.settings.output.topic
    _limit_topic(pipeline.bootstrap, out, 50_000)
    common = {"bootstrap.servers": pipeline.bootstrap}
    limits = size_limits(common, common, [out, unique("missing")])
    assert limits.max_record_bytes(out) == 50_000 - SIZE_MARGIN_BYTES
    sink = OutputSink(common, limits)
    batch = InflightBatch()

    assert not sink.fits(out, b"k", b"v" * 50_000, None)
    with pytest.raises(RecordTooLarge) as refused:
        sink.produce(batch, out, b"k", b"v" * 50_000, [("h", b"1")])
    assert refused.value.stage == "produce"
    assert refused.value.topic == out
    assert batch.pending == 0, "nothing was queued"

    assert sink.fits(out, b"k", b"v" * 40_000, None)
    sink.produce(batch, out, b"k", b"v" * 40_000, None)
    sink.seal(batch)
    sink.flush(30)
    assert batch.done
    assert batch.error is None
    [msg] = read_topic(pipeline.bootstrap, out, 1)
    assert msg.value() == b"v" * 40_000
