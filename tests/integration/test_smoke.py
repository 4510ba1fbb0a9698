"""The real broker and Redis do what the product relies on: partitions, idempotence, groups, transactions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamserve.ops.admin import TopicSpec, ensure_topics
from tests.integration.harness import read_topic, unique
from tests.integration.servers import REPO, STACK, Servers


def test_admin_creates_topic_with_partitions(bootstrap: str) -> None:
    topic = unique("smoke-admin")
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 6)])
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 6)])  # idempotent
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    assert len(metadata.topics[topic].partitions) == 6


def test_idempotent_produce_then_group_consume_with_manual_commits(bootstrap: str) -> None:
    topic, group = unique("smoke-produce"), unique("smoke-group")
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 4)])
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []
    for i in range(10_000):
        producer.produce(
            topic,
            f"v{i}".encode(),
            f"k{i % 97}".encode(),
            on_delivery=lambda err, _msg: failures.append(str(err)) if err else None,
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert failures == []

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    seen: set[bytes] = set()
    last: dict[int, int] = {}
    while len(seen) < 10_000:
        batch = consumer.consume(1000, 10)
        assert batch, f"consumed {len(seen)} of 10000 before the broker went quiet"
        for msg in batch:
            assert msg.error() is None
            seen.add(msg.value())
            last[msg.partition()] = msg.offset()
        consumer.commit(asynchronous=False)
    committed = consumer.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
    consumer.close()
    assert len(seen) == 10_000
    assert {tp.partition: tp.offset for tp in committed} == {p: o + 1 for p, o in last.items()}
    assert sum(tp.offset for tp in committed) == 10_000


def test_transactions_commit_and_abort_seen_by_read_committed(bootstrap: str) -> None:
    topic = unique("smoke-txn")
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 2)])
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique("smoke-txn-id")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(100):
        producer.produce(topic, f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    for i in range(50):
        producer.produce(topic, f"aborted-{i}".encode())
    assert producer.flush(30) == 0  # on the broker, not just queued: abort must hide written records
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed-last")
    producer.commit_transaction(30)

    committed = read_topic(bootstrap, topic, 101, isolation="read_committed")
    values = sorted(msg.value() for msg in committed)
    assert len(values) == 101
    assert not any(v.startswith(b"aborted") for v in values)
    uncommitted = read_topic(bootstrap, topic, 151, isolation="read_uncommitted")
    assert sum(msg.value().startswith(b"aborted") for msg in uncommitted) == 50


def test_transactional_id_fencing_is_enforced(bootstrap: str) -> None:
    txn_id, topic = unique("smoke-fence"), unique("smoke-fenced")
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 1)])
    first = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id})
    first.init_transactions(30)
    second = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id})
    second.init_transactions(30)
    first.begin_transaction()
    first.produce(topic, b"zombie")
    try:
        first.commit_transaction(30)
        fenced = False
    except KafkaException as exc:
        fenced = exc.args[0].fatal() or "fenced" in str(exc).lower()
    assert fenced, "a second producer with the same transactional.id must fence the first"


def test_redis_pipelined_hset_hmget_round_trip(redis_client: redis.Redis) -> None:
    prefix = unique("smoke")
    writes = redis_client.pipeline(transaction=False)
    for i in range(1000):
        writes.hset(f"{prefix}:{i}", mapping={"a": i, "b": i * 0.5})
    writes.execute()
    reads = redis_client.pipeline(transaction=False)
    for i in range(1001):
        reads.hmget(f"{prefix}:{i}", ["a", "b", "missing"])
    replies = reads.execute()
    assert replies[7] == [b"7", b"3.5", None]
    assert all(float(r[0]) == i and float(r[1]) == i * 0.5 for i, r in enumerate(replies[:1000]))
    assert replies[1000] == [None, None, None]
    redis_client.delete(*[f"{prefix}:{i}" for i in range(1000)])


def test_stack_up_twice_never_starts_a_second_broker(stack: Servers) -> None:
    if stack.origin != "native stack (scripts/stack)":
        pytest.skip(f"servers come from {stack.origin}, not scripts/stack")
    state = Path(os.environ.get("STREAMSERVE_STACK_DIR", REPO / ".stack"))
    pids_before = {name: (state / f"{name}.pid").read_text().strip() for name in ("kafka", "redis")}
    again = subprocess.run([sys.executable, str(STACK), "up"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stdout + again.stderr
    assert {name: (state / f"{name}.pid").read_text().strip() for name in ("kafka", "redis")} == pids_before
    ours = subprocess.run(["pgrep", "-f", f"kafka.Kafka {state}"], capture_output=True, text=True).stdout.split()
    assert ours == [pids_before["kafka"]], f"exactly one broker of this stack runs: {ours}"
