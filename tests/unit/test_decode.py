"""Avro decoding: local schema, Schema Registry wire format, schema evolution, bad bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from streamserve.errors import DecodeError
from streamserve.pipeline.decode import LocalSchemaDecoder, RegistryDecoder, encode_wire, load_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
EVENT: dict[str, Any] = {
    "event_id": "e-1",
    "card_id": "card-000001",
    "merchant_id": "merchant-0001",
    "amount": 12.5,
    "hour_of_day": 3,
    "is_online": True,
    "event_time": 1_700_000_000_000,
}


def avro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


@pytest.fixture
def schema() -> Any:
    return load_schema(SCHEMAS / "card_transaction.avsc")


def test_local_schema_round_trip(schema: Any) -> None:
    decoded = LocalSchemaDecoder(schema)(avro(schema, EVENT))
    assert decoded["event_id"] == "e-1"
    assert decoded["amount"] == 12.5
    assert decoded["is_online"] is True
    assert decoded["event_time"] == EVENT["event_time"], "timestamp-millis is read as its long: epoch ms"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"\x0ae-1", "not a valid Avro record"),
        (bytes(range(200, 240)), "not a valid Avro record|ends at byte"),
    ],
)
def test_local_schema_rejects_bad_bytes(schema: Any, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        LocalSchemaDecoder(schema)(payload)


def test_truncated_record_is_rejected(schema: Any) -> None:
    data = avro(schema, EVENT)
    with pytest.raises(DecodeError):
        LocalSchemaDecoder(schema)(data[: len(data) - 3])


def test_record_of_another_schema_leaves_bytes_over(schema: Any) -> None:
    other = fastavro.parse_schema(
        {
            "type": "record",
            "name": "Other",
            "fields": [{"name": "a", "type": "string"} for _ in range(1)]
            + [{"name": f"f{i}", "type": "string"} for i in range(8)],
        }
    )
    payload = avro(other, {"a": "x" * 3, **{f"f{i}": "y" * 40 for i in range(8)}})
    with pytest.raises(DecodeError):
        LocalSchemaDecoder(schema)(payload)


@pytest.fixture
def registry() -> SchemaRegistryClient:
    return SchemaRegistryClient.new_client({"url": "mock://streamserve-unit"})


def test_wire_format_with_evolved_writer_schema(schema: Any, registry: SchemaRegistryClient) -> None:
    # Producers moved to v2: a new optional field, and `is_online` dropped... the reader's default covers it.
    writer_v2 = json.loads((SCHEMAS / "card_transaction.avsc").read_text())
    writer_v2["fields"].append({"name": "channel", "type": "string", "default": "web"})
    schema_id = registry.register_schema("transactions-value", Schema(json.dumps(writer_v2), "AVRO"))
    payload = encode_wire(schema_id, fastavro.parse_schema(writer_v2), {**EVENT, "channel": "pos"})
    decoded = RegistryDecoder(registry, schema)(payload)
    assert decoded["card_id"] == "card-000001"
    assert "channel" not in decoded, "the reader schema decides the fields the pipeline sees"


def test_wire_format_resolves_a_missing_field_to_the_reader_default(registry: SchemaRegistryClient) -> None:
    reader = fastavro.parse_schema(
        {
            "type": "record",
            "name": "R",
            "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": "double", "default": 7.5}],
        }
    )
    writer = {"type": "record", "name": "R", "fields": [{"name": "a", "type": "string"}]}
    schema_id = registry.register_schema("r-value", Schema(json.dumps(writer), "AVRO"))
    decoded = RegistryDecoder(registry, reader)(encode_wire(schema_id, fastavro.parse_schema(writer), {"a": "x"}))
    assert decoded == {"a": "x", "b": 7.5}


def test_wire_format_errors(schema: Any, registry: SchemaRegistryClient) -> None:
    decoder = RegistryDecoder(registry, schema)
    with pytest.raises(DecodeError, match="magic byte"):
        decoder(b"\x01\x00\x00\x00\x01abc")
    with pytest.raises(DecodeError, match="too short"):
        decoder(b"\x00\x00")
    with pytest.raises(DecodeError, match="schema id 424242"):
        decoder(b"\x00" + (424242).to_bytes(4, "big") + b"\x00")
    incompatible = {
        "type": "record",
        "name": "CardTransaction",
        "namespace": "io.streamserve.examples.fraud",
        "fields": [{"name": "event_id", "type": "long"}],
    }
    schema_id = registry.register_schema("bad-value", Schema(json.dumps(incompatible), "AVRO"))
    with pytest.raises(DecodeError, match=r"resolved|not a valid"):
        decoder(encode_wire(schema_id, fastavro.parse_schema(incompatible), {"event_id": 5}))
