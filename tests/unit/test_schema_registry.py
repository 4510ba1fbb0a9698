"""Schema Registry logic without a server: the unavailability policy, subject names, resolution rules, prefixes.

The real registry (Apicurio, Confluent-compatible API) is exercised in tests/integration/test_schema_registry.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import yaml
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext

from streamserve.config import load_settings
from streamserve.errors import ConfigError, DecodeError, RegistryUnavailable
from streamserve.ops.schema_registry import resolution_errors
from streamserve.pipeline.decode import RegistryDecoder, encode_wire
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.subjects import prediction_prefix, subject_name
from streamserve.records import Event, ModelOutputs, Source

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
READER: dict[str, Any] = {
    "type": "record",
    "name": "R",
    "namespace": "t",
    "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": "double", "default": 1.5}],
}


class FlakyRegistry:
    """Answers get_schema like a registry that is down for `failures` calls (connection refused)."""

    def __init__(self, schema: dict[str, Any], failures: int, missing: bool = False) -> None:
        self.schema, self.failures, self.missing, self.calls = schema, failures, missing, 0

    def get_schema(self, schema_id: int) -> Schema:
        self.calls += 1
        if self.missing:
            raise SchemaRegistryError(404, 40403, f"Schema {schema_id} not found")
        if self.calls <= self.failures:
            raise ConnectionRefusedError(111, "Connection refused")
        return Schema(json.dumps(self.schema), "AVRO")


def payload(schema: dict[str, Any] = READER, record: dict[str, Any] | None = None) -> bytes:
    return encode_wire(7, fastavro.parse_schema(schema), record or {"a": "x", "b": 2.0})


def test_wait_policy_retries_with_backoff_until_the_registry_answers() -> None:
    registry, pauses = FlakyRegistry(READER, failures=5), []
    decoder = RegistryDecoder(registry, fastavro.parse_schema(READER), "wait", 100, 250, sleep=pauses.append)
    assert decoder(payload()) == {"a": "x", "b": 2.0}
    assert pauses == [0.1, 0.2, 0.25, 0.25, 0.25]
    assert decoder(payload()) == {"a": "x", "b": 2.0}
    assert registry.calls == 6, "the writer schema is fetched once per id"


def test_dead_letter_and_fail_policies() -> None:
    reader = fastavro.parse_schema(READER)
    with pytest.raises(DecodeError, match="Schema Registry unavailable fetching schema id 7"):
        RegistryDecoder(FlakyRegistry(READER, failures=1), reader, "dead_letter")(payload())
    with pytest.raises(RegistryUnavailable, match="ConnectionRefusedError"):
        RegistryDecoder(FlakyRegistry(READER, failures=1), reader, "fail")(payload())


def test_an_unknown_id_is_the_records_fault_and_is_remembered_for_a_while() -> None:
    registry, now = FlakyRegistry(READER, failures=0, missing=True), [0.0]
    decoder = RegistryDecoder(registry, fastavro.parse_schema(READER), "wait", clock=lambda: now[0])
    for _ in range(3):
        with pytest.raises(DecodeError, match="schema id 7 not found"):
            decoder(payload())
    assert registry.calls == 1
    now[0] = RegistryDecoder.MISSING_TTL_S + 1
    with pytest.raises(DecodeError):
        decoder(payload())
    assert registry.calls == 2


def test_a_batch_decodes_now_only_when_every_writer_id_is_known() -> None:
    """The worker decodes a batch ahead of its turn only then: a request to a registry that is down would hold
    the batch before it (the wait policy retries until the registry answers)."""
    registry, now = FlakyRegistry(READER, failures=0), [0.0]
    decoder = RegistryDecoder(registry, fastavro.parse_schema(READER), "wait", clock=lambda: now[0])
    known, other = payload(), encode_wire(8, fastavro.parse_schema(READER), {"a": "y", "b": 0.0})
    assert not decoder.decodes_now([known])
    assert registry.calls == 0, "asking costs no request"
    decoder.decode_many([known])
    assert decoder.decodes_now([known, None, b"", b"\x00\x01", b"not wire format"]), "bad values ask nobody"
    assert not decoder.decodes_now([known, other])
    registry.missing = True
    decoder.decode_many([other])  # id 8 answered as missing: remembered for MISSING_TTL_S
    assert decoder.decodes_now([known, other])
    now[0] = RegistryDecoder.MISSING_TTL_S + 1
    assert not decoder.decodes_now([other]), "a missing id is asked again once its answer expired"
    assert registry.calls == 2


def test_an_unresolvable_writer_schema_names_its_id() -> None:
    writer = {**READER, "fields": [{"name": "a", "type": "int"}]}
    decoder = RegistryDecoder(FlakyRegistry(writer, failures=0), fastavro.parse_schema(READER))
    with pytest.raises(DecodeError, match=r"writer schema id 7: .*resolved"):
        decoder(payload(writer, {"a": 3}))


@pytest.mark.parametrize(
    ("strategy", "subject"),
    [
        ("topic", "preds-value"),
        ("record", "io.streamserve.Prediction"),
        ("topic_record", "preds-io.streamserve.Prediction"),
    ],
)
def test_subject_name_strategies(strategy: str, subject: str) -> None:
    schema = {"type": "record", "name": "Prediction", "namespace": "io.streamserve", "fields": []}
    assert subject_name(strategy, "preds", schema) == subject


def test_resolution_rules() -> None:
    def errors(writer: Any, reader: Any) -> list[str]:
        parse = fastavro.parse_schema
        return resolution_errors(parse(writer, expand=True), parse(reader, expand=True))

    added = {**READER, "fields": [*READER["fields"], {"name": "c", "type": "int", "default": 0}]}
    assert errors(READER, added) == []  # a field added with a default
    assert errors(added, READER) == []  # a field the reader does not know is skipped
    assert errors({**READER, "fields": [{"name": "a", "type": "string"}]}, READER) == []  # b takes its default
    no_default = {**READER, "fields": [*READER["fields"], {"name": "c", "type": "int"}]}
    assert errors(READER, no_default) == ["field c is not in the writer's schema and has no default in the reader's"]
    promoted = {**READER, "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": "int"}]}
    assert errors(promoted, READER) == []  # int is promoted to double
    assert errors(READER, promoted) == ["b: the writer's double cannot be read as int"]
    nullable = {**READER, "fields": [{"name": "a", "type": ["null", "string"]}]}
    assert errors(READER, nullable) == []
    assert errors(nullable, READER) == ["a: the writer's null cannot be read as string"]


def _settings(tmp_path: Path, **output: Any) -> Any:
    shutil.copytree(SCHEMAS, tmp_path / "schemas")
    config = yaml.safe_load((REPO / "examples" / "fraud" / "pipeline.yaml").read_text())
    config["output"] = {**config["output"], **output}
    config["kafka"] = {**config.get("kafka", {}), "schema_registry_url": "mock://streamserve-prefix"}
    (tmp_path / "examples" / "fraud").mkdir(parents=True)
    path = tmp_path / "examples" / "fraud" / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


def test_wire_format_predictions_are_read_by_a_plain_avro_deserializer(tmp_path: Path) -> None:
    settings = _settings(tmp_path, wire_format=True, subject_name_strategy="topic_record")
    client = SchemaRegistryClient.new_client({"url": "mock://streamserve-prefix"})
    prefix = prediction_prefix(settings, client)
    assert prefix[:1] == b"\x00"
    assert len(prefix) == 5
    assert f"{settings.output.topic}-io.streamserve.Prediction" in client.get_subjects()
    encoder = PredictionEncoder(settings.output.schema_path, settings.input, value_prefix=prefix)
    fields = {"event_id": "e-1", "card_id": "c-1", "event_time": None}
    encoded, rejected = encoder.encode(
        [Event(Source("in", 0, 5, None, b"", None, 1_700_000_000_000), fields)],
        ModelOutputs(score=np.array([0.25]), label=np.array([0])),
        "fraud",
        "v1",
    )
    assert not rejected
    read = AvroDeserializer(client)(encoded[0].value, SerializationContext(settings.output.topic, MessageField.VALUE))
    assert (read["event_id"], read["score"], read["source_offset"]) == ("e-1", 0.25, 5)


def test_wire_format_is_off_by_default_and_needs_a_registry(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert prediction_prefix(settings) == b""
    config = yaml.safe_load((tmp_path / "examples" / "fraud" / "pipeline.yaml").read_text())
    del config["kafka"]["schema_registry_url"]
    config["output"]["wire_format"] = True
    path = tmp_path / "examples" / "fraud" / "no-registry.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"wire_format needs kafka\.schema_registry_url"):
        load_settings(path)
