"""Avro decoding of input values: a local writer schema or Confluent Schema Registry wire format."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.types import Schema

from streamserve.errors import ConfigError, DecodeError

WIRE_MAGIC = 0
_WIRE_HEADER = struct.Struct(">bI")


def load_schema(path: Path) -> Schema:
    """Parse an .avsc file once, with a message naming the file when it is not valid Avro."""
    try:
        return fastavro.parse_schema(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ConfigError(f"Avro schema file not found: {path}") from exc
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise ConfigError(f"invalid Avro schema {path}: {exc}") from exc


class Decoder(Protocol):
    """Turns an input value into an event dict, or raises DecodeError."""

    def __call__(self, value: bytes | None) -> dict[str, Any]: ...


def _read_exact(payload: bytes, offset: int, writer: Schema, reader: Schema | None) -> dict[str, Any]:
    buffer = io.BytesIO(payload)
    buffer.seek(offset)
    try:
        record = fastavro.schemaless_reader(buffer, writer, reader)
    except IndexError as exc:
        # fastavro looks enum symbols (and union branches) up by index: a newer writer's extra symbol lands here.
        raise DecodeError(
            f"not a valid Avro record: an enum symbol or union branch index is beyond the schema's (an unknown"
            f" symbol of enum {_enum_names(reader or writer)} from a newer writer schema, or corrupt bytes): {exc}"
        ) from exc
    except (EOFError, ValueError, TypeError, KeyError, OverflowError, struct.error) as exc:
        # UnicodeDecodeError is a ValueError; SchemaResolutionError is an AvroException below.
        raise DecodeError(f"not a valid Avro record: {type(exc).__name__}: {exc}") from exc
    except fastavro.read.SchemaResolutionError as exc:
        raise DecodeError(f"writer schema cannot be resolved to the reader schema: {exc}") from exc
    if buffer.tell() != len(payload):
        # Bytes of another schema often decode "successfully" but leave bytes over.
        raise DecodeError(f"Avro record ends at byte {buffer.tell()} of {len(payload)}: wrong schema?")
    if not isinstance(record, dict):
        raise DecodeError(f"expected an Avro record, got {type(record).__name__}")
    return record


def _enum_names(schema: Any) -> str:
    """The enums of a schema, as ``Name (field)`` for the reason of a dead letter."""
    found: list[str] = []

    def walk(node: Any, field: str) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch, field)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind == "enum":
                found.append(f"{str(node.get('name', '?')).rsplit('.', 1)[-1]} ({field})")
            elif kind == "record":
                for child in node.get("fields", []):
                    walk(child["type"], f"{field}.{child['name']}" if field else child["name"])
            elif kind == "array":
                walk(node.get("items"), field)
            elif kind == "map":
                walk(node.get("values"), field)
            elif isinstance(kind, (dict, list)):
                walk(kind, field)

    walk(schema, "")
    return ", ".join(found) or "(none in the schema)"


class LocalSchemaDecoder:
    """Schemaless Avro written with a schema both sides know (the configured .avsc)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def __call__(self, value: bytes | None) -> dict[str, Any]:
        if not value:
            raise DecodeError("empty value (tombstone?)")
        return _read_exact(value, 0, self.schema, None)


class RegistryDecoder:
    """Confluent wire format (magic byte + schema id); writer schemas come from the registry.

    Each writer schema is resolved to the local reader schema, so producers may evolve their schema
    compatibly (added fields with defaults, removed fields) without the worker changing.
    """

    def __init__(self, registry: Any, reader_schema: Schema) -> None:
        self._registry = registry
        self._reader = reader_schema
        self._writers: dict[int, Schema] = {}

    @classmethod
    def from_config(cls, registry_config: Mapping[str, str], reader_schema: Schema) -> RegistryDecoder:
        """A decoder backed by confluent-kafka's Schema Registry client: url (``mock://`` for tests), TLS and
        basic-auth settings as KafkaSettings.schema_registry_config() gives them."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient.new_client(dict(registry_config)), reader_schema)

    def writer_schema(self, schema_id: int) -> Schema:
        """The parsed writer schema for an id, fetched once."""
        schema = self._writers.get(schema_id)
        if schema is None:
            from confluent_kafka.schema_registry import SchemaRegistryError

            try:
                registered = self._registry.get_schema(schema_id)
            except SchemaRegistryError as exc:
                raise DecodeError(f"schema id {schema_id} not found in the registry: {exc}") from exc
            schema = fastavro.parse_schema(json.loads(registered.schema_str))
            self._writers[schema_id] = schema
        return schema

    def __call__(self, value: bytes | None) -> dict[str, Any]:
        if not value or len(value) < _WIRE_HEADER.size:
            raise DecodeError("value too short for Schema Registry wire format")
        magic, schema_id = _WIRE_HEADER.unpack_from(value)
        if magic != WIRE_MAGIC:
            raise DecodeError(f"unknown magic byte {magic} (expected Schema Registry wire format)")
        return _read_exact(value, _WIRE_HEADER.size, self.writer_schema(schema_id), self._reader)


def make_decoder(schema_path: Path, registry_config: Mapping[str, str] | None) -> Decoder:
    """The decoder a pipeline config asks for (Schema Registry wire format when a registry is configured)."""
    schema = load_schema(schema_path)
    if registry_config:
        return RegistryDecoder.from_config(registry_config, schema)
    return LocalSchemaDecoder(schema)


def encode_wire(schema_id: int, schema: Schema, record: dict[str, Any]) -> bytes:
    """Serialize a record in Schema Registry wire format (for producers and tests)."""
    buffer = io.BytesIO()
    buffer.write(_WIRE_HEADER.pack(WIRE_MAGIC, schema_id))
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()
