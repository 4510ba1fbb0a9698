"""At-least-once offset commits: an idle worker's committed offsets reach the input's end offsets."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import fastavro
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamserve.demo.data import Entities, make_events
from streamserve.pipeline.decode import load_schema
from tests.integration.harness import Pipeline, WorkerThread, predictions, wait_until


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """High watermark of every partition of a topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watermarks-{uuid.uuid4()}"})
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
            for p in range(partitions)
        }
    finally:
        consumer.close()


def committed_offsets(pipeline: Pipeline) -> dict[int, int]:
    """The group's committed offset of every input partition (negative when none)."""
    s = pipeline.settings
    admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
    request = ConsumerGroupTopicPartitions(
        s.kafka.group_id, [TopicPartition(s.input.topic, p) for p in range(pipeline.partitions)]
    )
    result = admin.list_consumer_group_offsets([request])[s.kafka.group_id].result(timeout=10)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def records_behind(pipeline: Pipeline, end: dict[int, int]) -> dict[int, int]:
    """Offsets between the committed one and the end, for every partition that is behind."""
    committed = committed_offsets(pipeline)
    return {p: end[p] - max(committed.get(p, 0), 0) for p in end if committed.get(p, -1) != end[p]}


def wait_caught_up(pipeline: Pipeline, end: dict[int, int], timeout_s: float) -> None:
    """Poll until the group's committed offsets equal `end`; fail saying how far behind each partition is."""
    try:
        wait_until(lambda: not records_behind(pipeline, end), timeout_s, "committed offsets to reach the end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; behind per partition: {records_behind(pipeline, end)}") from None


def test_idle_worker_commits_past_the_transaction_markers_of_its_input(
    pipeline_factory: Callable[..., Pipeline], entities: Entities
) -> None:
    pipeline = pipeline_factory(partitions=2)
    s = pipeline.settings
    events = list(make_events(entities, 500, seed=31))
    schema = load_schema(s.input.schema_path)
    producer = Producer({"bootstrap.servers": pipeline.bootstrap, "transactional.id": f"upstream-{uuid.uuid4()}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for event in events:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, event)
        producer.produce(s.input.topic, buffer.getvalue(), str(event[s.input.key_field]).encode())
    producer.commit_transaction(30)
    end: dict[int, int] = {}

    def markers_written() -> bool:  # the coordinator writes them after commit_transaction() returns
        end.update(end_offsets(pipeline.bootstrap, s.input.topic, pipeline.partitions))
        return sum(end.values()) == len(events) + pipeline.partitions  # one commit marker per partition

    wait_until(markers_written, 30, "the transaction's commit markers in the input partitions")

    worker = WorkerThread(s)
    try:
        assert len(predictions(pipeline, len(events))) == len(events)
        # The last record of each partition releases end - 1; only the idle worker's position passes the marker.
        wait_caught_up(pipeline, end, 30)
    finally:
        worker.stop()
    assert records_behind(pipeline, end) == {}
