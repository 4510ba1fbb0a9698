"""Workers as separate processes: kill -9 and restart, two workers sharing and handing over partitions."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streamserve.demo.data import Entities, make_events
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import Pipeline, WorkerProcess, produce_in_background, read_topic, wait_until


def _predicted_ids(pipeline: Pipeline, expected: int, timeout_s: float = 120) -> list[str]:
    schema = load_schema(pipeline.settings.output.schema_path)
    messages = read_topic(pipeline.bootstrap, pipeline.settings.output.topic, expected, timeout_s, settle_s=2)
    return [str(decode_prediction(schema, msg.value())["event_id"]) for msg in messages]


def _count_output(pipeline: Pipeline) -> int:
    admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": pipeline.bootstrap, "group.id": "watermarks"})
    try:
        total = 0
        for p in (
            admin.list_topics(pipeline.settings.output.topic, timeout=10)
            .topics[pipeline.settings.output.topic]
            .partitions
        ):
            total += consumer.get_watermark_offsets(TopicPartition(pipeline.settings.output.topic, p), timeout=10)[1]
        return total
    finally:
        consumer.close()


def _group_assignment(pipeline: Pipeline) -> dict[str, list[int]]:
    admin = AdminClient({"bootstrap.servers": pipeline.bootstrap})
    group = pipeline.settings.kafka.group_id
    try:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    except KafkaException:  # e.g. NOT_COORDINATOR while a fresh broker loads __consumer_offsets
        return {}
    return {
        m.client_id + "/" + m.member_id[-6:]: sorted(tp.partition for tp in m.assignment.topic_partitions)
        for m in description.members
    }


def test_kill_9_mid_stream_then_restart_loses_no_event(pipeline: Pipeline, entities: Entities, tmp_path: Path) -> None:
    events = list(make_events(entities, 20_000, seed=31))
    first = WorkerProcess(pipeline.path, tmp_path, "victim")
    first.wait_logged("assigned")
    producer = produce_in_background(pipeline, events, rate=4000)
    wait_until(lambda: _count_output(pipeline) >= 4000, 60, "4000 predictions before the kill")
    first.kill()  # SIGKILL: no drain, no commit of the open batch
    killed_at = _count_output(pipeline)
    assert killed_at < len(events), "the kill must land mid-stream"
    second = WorkerProcess(pipeline.path, tmp_path, "survivor")
    producer.join(60)
    try:
        ids = _predicted_ids(pipeline, len(events))
    finally:
        assert second.stop() == 0, second.log_tail()
    missing = {e["event_id"] for e in events} - set(ids)
    assert not missing, f"{len(missing)} events without a prediction after kill -9 (e.g. {sorted(missing)[:3]})"
    print(f"kill -9 at {killed_at} predictions; {len(ids) - len(events)} duplicates (at-least-once)")


def test_two_workers_share_partitions_and_hand_over_on_stop(
    pipeline: Pipeline, entities: Entities, tmp_path: Path
) -> None:
    events = list(make_events(entities, 12_000, seed=41))
    a = WorkerProcess(pipeline.path, tmp_path, "worker-a")
    b = WorkerProcess(pipeline.path, tmp_path, "worker-b")

    def shared() -> bool:
        assignment = _group_assignment(pipeline)
        return len(assignment) == 2 and all(assignment.values()) and sum(map(len, assignment.values())) == 4

    wait_until(shared, 60, "two members sharing the 4 partitions")
    producer = produce_in_background(pipeline, events, rate=3000)
    wait_until(lambda: _count_output(pipeline) >= 3000, 60, "3000 predictions before stopping one worker")
    assert a.stop() == 0, a.log_tail()  # SIGTERM: drain, commit, leave the group
    wait_until(
        lambda: list(_group_assignment(pipeline).values()) == [[0, 1, 2, 3]],
        60,
        "the remaining worker to own all 4 partitions",
    )
    producer.join(60)
    try:
        ids = _predicted_ids(pipeline, len(events))
    finally:
        assert b.stop() == 0, b.log_tail()
    missing = {e["event_id"] for e in events} - set(ids)
    assert not missing, f"{len(missing)} events without a prediction after the hand-over"
    assert "revoking" in a.log_tail(200)
