"""A worker and a publisher end to end on the secured stack: SASL_SSL + ACLs, Redis over TLS with ACL users."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import Consumer, KafkaError, Producer

from streamserve.clients import redis_client
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.ops.admin import ensure_topics, grant, pipeline_topics, publisher_acls, worker_acls
from streamserve.ops.tools import produce_avro
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import Pipeline, WorkerThread, unique, wait_until
from tests.secure.conftest import SecureStack

SIGNATURE = "X-Amz-Signature=s3cr3t-signature-do-not-log"


def _read(config: dict[str, Any], topic: str, expected: int, timeout_s: float = 90) -> list[Any]:
    """Every record of `topic` from the beginning, until `expected` arrived."""
    consumer = Consumer(
        {**config, "group.id": unique("reader"), "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    messages: list[Any] = []
    try:
        wait_until(
            lambda: (
                bool(messages.extend(m for m in consumer.consume(1000, 0.2) if m.error() is None))
                or len(messages) >= expected
            ),
            timeout_s,
            f"{expected} records on {topic} (have {len(messages)})",
            interval_s=0,
        )
    finally:
        consumer.close()
    return messages


def _load_features(client: redis.Redis, prefix: str, entities: Entities) -> None:
    writes = client.pipeline(transaction=False)
    for card_id, values in entities.cards.items():
        writes.hset(f"{prefix}:card:{card_id}", mapping=values)
    for merchant_id, values in entities.merchants.items():
        writes.hset(f"{prefix}:merchant:{merchant_id}", mapping=values)
    writes.execute()


def test_worker_and_publisher_over_sasl_ssl_with_acls_and_redis_over_tls(
    secure_stack: SecureStack,
    secure_redis_admin: redis.Redis,
    tmp_path: Any,
    models: dict[str, TrainedModel],
    entities: Entities,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = secure_stack.kafka_config("admin")
    pipe = Pipeline(
        secure_stack.bootstrap,
        secure_stack.redis_url,
        tmp_path,
        models["v1"].path,
        partitions=2,
        overrides={
            "kafka.client": secure_stack.kafka_client("worker"),
            "kafka.sasl_password": secure_stack.password("kafka", "worker"),
            "redis": secure_stack.redis_settings("worker"),
        },
    )
    s = pipe.settings
    ensure_topics(admin, pipeline_topics(s, pipe.partitions))
    grant(admin, worker_acls(s, "User:worker") + publisher_acls(s, "User:publisher"))
    _load_features(secure_redis_admin, pipe.prefix, entities)

    # The worker's Redis user may read features but not write them.
    as_worker = redis_client(s.redis)
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_worker.hset(f"{pipe.prefix}:card:x", "avg_amount_30d", 1.0)
    as_worker.close()

    input_schema, output_schema = load_schema(s.input.schema_path), load_schema(s.output.schema_path)
    worker = WorkerThread(s)
    published = None
    try:
        events = list(make_events(entities, 300, seed=11))
        produce_avro(admin, s.input.topic, input_schema, events, s.input.key_field)
        first = [decode_prediction(output_schema, m.value()) for m in _read(admin, s.output.topic, len(events))]
        assert {p["event_id"] for p in first} == {e["event_id"] for e in events}, "every event predicted"
        assert {p["model_version"] for p in first} == {"v1"}

        # The publisher announces v2 with the CLI, as a user would; the artifact URI carries a signature.
        publisher_config = yaml.safe_load(pipe.path.read_text())
        publisher_config["kafka"]["client"] = secure_stack.kafka_client("publisher")
        publisher_config["kafka"]["sasl_password"] = secure_stack.password("kafka", "publisher")
        publisher_yaml = tmp_path / "publisher.yaml"
        publisher_yaml.write_text(yaml.safe_dump(publisher_config))
        uri = f"file://{models['v2'].path}?{SIGNATURE}"
        command = [sys.executable, "-m", "streamserve", "models", "publish", "-c", str(publisher_yaml)]
        published = subprocess.run(
            [*command, "--model", s.model.name, "--version", "v2", "--uri", uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert published.returncode == 0, published.stderr
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2", 60, "the worker to deploy v2")

        more = list(make_events(entities, 100, seed=12))
        produce_avro(admin, s.input.topic, input_schema, more, s.input.key_field)
        outputs = [decode_prediction(output_schema, m.value()) for m in _read(admin, s.output.topic, 400)]
        assert {p["model_version"] for p in outputs if p["event_id"] in {e["event_id"] for e in more}} == {"v2"}

        # Workers may read the control topic but never write it.
        denied: list[KafkaError] = []
        intruder = Producer(secure_stack.kafka_config("worker"))
        intruder.produce(s.control.topic, b"forged", b"fraud", on_delivery=lambda err, _: denied.append(err))
        intruder.flush(30)
        assert [e.code() if e else None for e in denied] == [KafkaError.TOPIC_AUTHORIZATION_FAILED]
    finally:
        worker.stop()
        keys = list(secure_redis_admin.scan_iter(f"{pipe.prefix}:*", count=1000))
        if keys:
            secure_redis_admin.delete(*keys)

    captured = capfd.readouterr()
    logs = "\n".join([caplog.text, captured.out, captured.err, published.stdout, published.stderr])
    assert "deploy" in logs or "v2" in logs, "the logs were captured"
    for name, secret in [
        ("Kafka worker password", secure_stack.password("kafka", "worker")),
        ("Kafka publisher password", secure_stack.password("kafka", "publisher")),
        ("Redis worker password", secure_stack.password("redis", "worker")),
    ]:
        assert secret not in logs, f"the {name} appears in the logs"
        assert secret not in repr(s), f"the {name} appears in the settings' repr"
        assert secret not in str(s.model_dump()), f"the {name} appears in the settings' dump"
    # A presigned artifact URI is a credential too: its query string must be redacted wherever it is logged.
    assert SIGNATURE.split("=", 1)[1] not in logs, "the artifact URI's query string appears in the logs"
