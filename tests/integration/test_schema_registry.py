"""The real Schema Registry (Apicurio, Confluent-compatible API) with the real broker and Redis.

Producers use confluent-kafka's AvroSerializer; predictions are read back with its AvroDeserializer and nothing
else. The registry starts once per session, only when these tests run (tests/integration/servers.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.pipeline.deadletter import HEADER_ERROR_MESSAGE, HEADER_STAGE
from tests.integration.harness import (
    SCHEMAS,
    Pipeline,
    WorkerThread,
    headers_of,
    offline_features,
    offline_scores,
    read_topic,
    wait_until,
)
from tests.integration.servers import Registry

BASE = json.loads((SCHEMAS / "card_transaction.avsc").read_text())
# v1 carries a field the reader does not know (with a default); v2 drops it and adds another with a default.
WRITER_V1 = {**BASE, "fields": [*BASE["fields"], {"name": "legacy_score", "type": "double", "default": 0.0}]}
WRITER_V2 = {**BASE, "fields": [*BASE["fields"], {"name": "merchant_country", "type": "string", "default": "NL"}]}
# The reader cannot resolve this one: amount is a string.
UNRESOLVABLE = {
    **BASE,
    "fields": [{**f, "type": "string"} if f["name"] == "amount" else f for f in BASE["fields"]],
}


@pytest.fixture
def registry_client(schema_registry: Registry) -> SchemaRegistryClient:
    return schema_registry.client()  # bounded: a hung Apicurio fails the test with one line, in ~20 s


@pytest.fixture
def registry_pipeline(
    pipeline_factory: Callable[..., Pipeline], schema_registry: Registry, registry_client: SchemaRegistryClient
) -> Pipeline:
    pipe = pipeline_factory(
        partitions=2,
        **{
            "kafka.schema_registry_url": schema_registry.url,
            "kafka.schema_registry_backoff_ms": 100,
            "kafka.schema_registry_max_backoff_ms": 1000,
            "kafka.schema_registry_retries": 1,
            "kafka.schema_registry_timeout_s": 2.0,
            "output.wire_format": True,
            "output.subject_name_strategy": "topic_record",
        },
    )
    # Confluent's default rule; Apicurio's global default is NONE.
    registry_client.set_compatibility(f"{pipe.settings.input.topic}-value", "BACKWARD")
    return pipe


def serialize(
    client: SchemaRegistryClient, topic: str, schema: dict[str, Any], events: list[dict[str, Any]], **conf: Any
) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs in wire format, written by confluent-kafka's AvroSerializer (auto-registering)."""
    serializer = AvroSerializer(client, json.dumps(schema), conf=conf or None)
    ctx = SerializationContext(topic, MessageField.VALUE)
    return [(e["card_id"].encode(), serializer(e, ctx)) for e in events]


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for key, value in records:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def read_predictions(pipe: Pipeline, registry: Registry, expected: int) -> list[dict[str, Any]]:
    """Every prediction, decoded by a plain AvroDeserializer (the writer schema comes from the registry by id)."""
    deserialize = AvroDeserializer(registry.client())
    ctx = SerializationContext(pipe.settings.output.topic, MessageField.VALUE)
    try:
        messages = read_topic(pipe.bootstrap, pipe.settings.output.topic, expected)
    except AssertionError as exc:  # the worker waits for a registry that does not answer (on_unavailable=wait)?
        if _answers(registry.url):
            raise
        missing = str(exc)
    else:
        return [deserialize(msg.value(), ctx) for msg in messages]
    pytest.fail(  # outside the except: the line alone
        f"{missing}, and the Schema Registry (Apicurio, {registry.origin}) at {registry.url} does not answer "
        "GET /subjects within 2s: is Apicurio hung? `python3 scripts/stack status --registry-only`",
        pytrace=False,
    )


def assert_equal_to_offline(
    records: list[dict[str, Any]], events: list[dict[str, Any]], model: TrainedModel, client: redis.Redis, prefix: str
) -> None:
    counts = Counter(r["event_id"] for r in records)
    assert counts == Counter(e["event_id"] for e in events), "exactly one prediction per event"
    scores = {r["event_id"]: r["score"] for r in records}
    expected, _ = offline_scores(model, offline_features(events, client, prefix))
    np.testing.assert_allclose([scores[e["event_id"]] for e in events], expected, rtol=0, atol=1e-5)


def test_evolving_writer_schemas_are_all_predicted_and_an_unresolvable_one_is_dead_lettered(
    registry_pipeline: Pipeline,
    registry_client: SchemaRegistryClient,
    schema_registry: Registry,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
) -> None:
    pipe, topic = registry_pipeline, registry_pipeline.settings.input.topic
    events = list(make_events(entities, 600, seed=21))
    v1 = [{**e, "legacy_score": 0.5} for e in events[:300]]
    v2 = [{**e, "merchant_country": "DE"} for e in events[300:]]
    rogue_events = list(make_events(entities, 4, seed=22))
    rogue = [{**e, "amount": str(e["amount"])} for e in rogue_events]
    records = serialize(registry_client, topic, WRITER_V1, v1) + serialize(registry_client, topic, WRITER_V2, v2)
    # The registry refuses UNRESOLVABLE under the input subject (BACKWARD): a careless producer uses another one.
    rogue_records = serialize(
        registry_client, topic, UNRESOLVABLE, rogue, **{"subject.name.strategy": lambda ctx, name: f"{topic}-rogue"}
    )
    versions = registry_client.get_versions(f"{topic}-value")
    assert len(versions) == 2, "v1 then v2 registered under the input subject"

    worker = WorkerThread(pipe.settings)
    try:
        produce(pipe.bootstrap, topic, records[:300] + rogue_records + records[300:])
        outputs = read_predictions(pipe, schema_registry, 600)
        dead = read_topic(pipe.bootstrap, pipe.settings.output.dead_letter_topic, 4)
    finally:
        worker.stop()

    assert_equal_to_offline(outputs, events, models["v1"], redis_client, pipe.prefix)
    assert sorted(msg.value() for msg in dead) == sorted(value for _, value in rogue_records), "original bytes"
    for msg in dead:
        headers = headers_of(msg)
        assert headers[HEADER_STAGE] == b"decode"
        assert b"cannot be resolved to the reader schema" in headers[HEADER_ERROR_MESSAGE]
    subject = f"{pipe.settings.output.topic}-io.streamserve.Prediction"
    assert subject in registry_client.get_subjects(), "prediction schema under the topic_record strategy"
    assert worker.worker.stats.dead_letters == 4


def test_registry_down_for_10s_mid_stream_loses_nothing(
    registry_pipeline: Pipeline,
    registry_client: SchemaRegistryClient,
    schema_registry: Registry,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if schema_registry.bounce is None:
        pytest.fail("this test stops the registry: unset SCHEMA_REGISTRY_URL so the session starts its own")
    pipe, topic = registry_pipeline, registry_pipeline.settings.input.topic
    events = list(make_events(entities, 400, seed=23))
    before = serialize(registry_client, topic, WRITER_V1, events[:200])
    # Registered now, first seen by the worker while the registry is down: it must wait, not dead-letter.
    during = serialize(registry_client, topic, WRITER_V2, events[200:])
    worker = WorkerThread(pipe.settings)
    try:
        produce(pipe.bootstrap, topic, before)
        read_topic(pipe.bootstrap, pipe.settings.output.topic, 200, settle_s=0)
        bounce = threading.Thread(target=schema_registry.bounce, args=(10.0,), daemon=True)
        bounce.start()
        wait_until(lambda: not _answers(schema_registry.url), 60, "the registry to stop")
        produce(pipe.bootstrap, topic, during)
        bounce.join(240)
        assert not bounce.is_alive(), "the registry did not come back"
        outputs = read_predictions(pipe, schema_registry, 400)
    finally:
        worker.stop()
    assert_equal_to_offline(outputs, events, models["v1"], redis_client, pipe.prefix)
    assert worker.worker.stats.dead_letters == 0
    assert "Schema Registry unavailable fetching schema id" in caplog.text, "the wait policy was exercised"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/subjects", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamserve", "schemas", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,  # its requests have --timeout 5 s each: only a safety net
    )


def test_schemas_check_answers_yes_for_a_compatible_change_and_no_for_an_incompatible_one(
    registry_pipeline: Pipeline, registry_client: SchemaRegistryClient, tmp_path: Path
) -> None:
    pipe, topic = registry_pipeline, registry_pipeline.settings.input.topic
    registry_client.register_schema(f"{topic}-value", Schema(json.dumps(WRITER_V1), "AVRO"))
    yes = _check(pipe.path)
    assert yes.returncode == 0, yes.stdout + yes.stderr
    assert "resolves: the reader schema reads it" in yes.stdout
    assert "registry (BACKWARD): the reader schema is compatible" in yes.stdout

    # A reader that needs a field no writer sends (and has no default for it).
    reader = copy.deepcopy(BASE)
    reader["fields"].append({"name": "country", "type": "string"})
    reader_path = tmp_path / "reader.avsc"
    reader_path.write_text(json.dumps(reader))
    config = yaml.safe_load(pipe.path.read_text())
    config["input"]["schema"] = str(reader_path)
    incompatible = tmp_path / "incompatible.yaml"
    incompatible.write_text(yaml.safe_dump(config))
    no = _check(incompatible)
    assert no.returncode == 1, no.stdout + no.stderr
    assert "field country is not in the writer's schema and has no default" in no.stdout
    assert "registry (BACKWARD): the reader schema is NOT compatible" in no.stdout


def test_schemas_check_prints_the_reasons_of_the_registrys_no_on_apicurio(
    registry_pipeline: Pipeline, registry_client: SchemaRegistryClient, tmp_path: Path
) -> None:
    """The registry says NO where the pipeline's own reading is fine (a FORWARD subject), and under the global level
    alone (a subject without a level of its own, which Apicurio reports as NONE unless asked for the effective
    one): each NO is printed with the registry's rule, its level and the field that breaks it."""
    pipe, topic = registry_pipeline, registry_pipeline.settings.input.topic
    registry_client.set_compatibility(level="BACKWARD")  # the global level (Apicurio's own default is NONE)
    # Input: the registered writer has a field without default the reader lacks. The reader reads it (extra writer
    # fields are skipped), but under FORWARD readers of the registered schema must read the reader's events too.
    writer = {**BASE, "fields": [*BASE["fields"], {"name": "channel", "type": "string"}]}
    registry_client.set_compatibility(f"{topic}-value", "FORWARD")
    registry_client.register_schema(f"{topic}-value", Schema(json.dumps(writer), "AVRO"))
    # Output: the registered prediction schema lacks source_offset, which ours requires (no default): under the
    # global BACKWARD our schema cannot read the predictions already written.
    prediction = json.loads(pipe.settings.output.schema_path.read_text())
    older = {**prediction, "fields": [f for f in prediction["fields"] if f["name"] != "source_offset"]}
    subject = f"{pipe.settings.output.topic}-{prediction['namespace']}.{prediction['name']}"  # topic_record
    registry_client.register_schema(subject, Schema(json.dumps(older), "AVRO"))

    no = _check(pipe.path)

    assert no.returncode == 1, no.stdout + no.stderr
    out = no.stdout
    assert "resolves: the reader schema reads it" in out, out
    assert f"registry (FORWARD): the reader schema is NOT compatible with '{topic}-value'" in out, out
    assert (
        "readers of the registered schema cannot read new events: "
        "field channel is not in the writer's schema and has no default in the reader's"
    ) in out, out
    assert "registry (BACKWARD): the prediction schema is NOT compatible" in out, out
    assert (
        "the new schema cannot read old predictions: "
        "field source_offset is not in the writer's schema and has no default in the reader's"
    ) in out, out
    assert "registry (NONE)" not in out, "the subject's effective level is the global one"


def test_backtest_predictions_topic_is_in_the_wire_format_like_the_workers(
    registry_pipeline: Pipeline,
    registry_client: SchemaRegistryClient,
    schema_registry: Registry,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
) -> None:
    """With output.wire_format, the candidate's predictions a backtest writes to --predictions-topic start with the
    magic byte and a schema id too: a plain AvroDeserializer reads them, as it reads the workers'."""
    from streamserve.ops.admin import TopicSpec, ensure_topics
    from streamserve.ops.backtest import BacktestRequest, run_backtest
    from streamserve.ops.history import parse_position

    pipe, topic = registry_pipeline, registry_pipeline.settings.input.topic
    events = list(make_events(entities, 40, seed=61))
    produce(pipe.bootstrap, topic, serialize(registry_client, topic, BASE, events))
    candidate_topic = f"{pipe.settings.output.topic}.v2"
    ensure_topics({"bootstrap.servers": pipe.bootstrap}, [TopicSpec(candidate_topic, 1)])
    request = BacktestRequest(
        parse_position("beginning"),
        parse_position("end"),
        "v2",
        str(models["v2"].path),
        predictions_topic=candidate_topic,
    )
    report = run_backtest(pipe.settings, request)
    assert report["compared"] == len(events)

    deserialize = AvroDeserializer(schema_registry.client())
    ctx = SerializationContext(candidate_topic, MessageField.VALUE)
    written = read_topic(pipe.bootstrap, candidate_topic, len(events))
    assert all(m.value()[:1] == b"\x00" for m in written), "the wire format's magic byte"
    records = [deserialize(m.value(), ctx) for m in written]
    assert_equal_to_offline(records, events, models["v2"], redis_client, pipe.prefix)
