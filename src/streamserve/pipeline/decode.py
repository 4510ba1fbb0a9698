"""Avro decoding of input values: a local writer schema or Confluent Schema Registry wire format."""

from __future__ import annotations

import io
import json
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.types import Schema

from streamserve.config import KafkaSettings
from streamserve.errors import ConfigError, DecodeError, RegistryUnavailable

log = logging.getLogger(__name__)

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
    """One record from payload[offset:], written with `writer`, resolved to `reader` (None: the writer's)."""
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
    compatibly (added fields with defaults, removed fields) without the worker changing. Writer schemas are
    fetched once per id and kept (at most ``cache_capacity``); one equal to the reader schema is read without
    resolution. An id the registry does not know, or a writer schema the reader cannot resolve, is the
    record's fault (DecodeError: dead-lettered). A registry that does not answer is not: ``on_unavailable``
    says whether to wait for it (retry with backoff, blocking intake), dead-letter the record, or fail.
    """

    MISSING_TTL_S = 30.0
    """Ids the registry said it does not know are answered from memory this long (a poison storm costs one
    request per id, not one per record)."""

    def __init__(
        self,
        registry: Any,
        reader_schema: Schema,
        on_unavailable: str = "wait",
        backoff_ms: int = 200,
        max_backoff_ms: int = 5000,
        cache_capacity: int = 1000,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._reader = reader_schema
        self._on_unavailable = on_unavailable
        self._backoff_s, self._max_backoff_s = backoff_ms / 1000, max_backoff_ms / 1000
        self._capacity = cache_capacity
        self._sleep, self._clock = sleep, clock
        self._writers: OrderedDict[int, tuple[Schema, Schema | None]] = OrderedDict()
        self._missing: dict[int, tuple[float, str]] = {}

    @classmethod
    def from_config(
        cls, registry_config: Mapping[str, str | int | float], reader_schema: Schema, **policy: Any
    ) -> RegistryDecoder:
        """A decoder backed by confluent-kafka's Schema Registry client: url (``mock://`` for tests), TLS and
        basic-auth settings as KafkaSettings.schema_registry_config() gives them."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient.new_client(dict(registry_config)), reader_schema, **policy)

    @classmethod
    def from_settings(cls, kafka: KafkaSettings, reader_schema: Schema) -> RegistryDecoder:
        """A decoder with the registry, retry policy and cache size of the kafka settings."""
        conf = kafka.schema_registry_config()
        if conf is None:
            raise ConfigError("kafka.schema_registry_url is not set")
        return cls.from_config(
            conf,
            reader_schema,
            on_unavailable=kafka.schema_registry_on_unavailable,
            backoff_ms=kafka.schema_registry_backoff_ms,
            max_backoff_ms=kafka.schema_registry_max_backoff_ms,
            cache_capacity=kafka.schema_registry_cache_capacity,
        )

    def writer_schema(self, schema_id: int) -> Schema:
        """The parsed writer schema for an id, fetched once."""
        return self._resolved(schema_id)[0]

    def _resolved(self, schema_id: int) -> tuple[Schema, Schema | None]:
        """(writer schema, reader schema to resolve it to, or None when they are the same)."""
        cached = self._writers.get(schema_id)
        if cached is not None:
            self._writers.move_to_end(schema_id)
            return cached
        registered = self._fetch(schema_id)
        if (registered.schema_type or "AVRO") != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {registered.schema_type} schema, not Avro")
        try:
            writer = fastavro.parse_schema(json.loads(registered.schema_str))
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise DecodeError(f"schema id {schema_id} is not a valid Avro schema: {exc}") from exc
        # The same schema (as parsed, logical types included) needs no resolution: the cheaper read.
        resolved = (writer, None if writer == self._reader else self._reader)
        self._writers[schema_id] = resolved
        if len(self._writers) > self._capacity:
            self._writers.popitem(last=False)
        return resolved

    def _fetch(self, schema_id: int) -> Any:
        """The registered schema of an id; DecodeError when the registry does not know it."""
        from confluent_kafka.schema_registry import SchemaRegistryError

        known_missing = self._missing.get(schema_id)
        if known_missing is not None and self._clock() < known_missing[0]:
            raise DecodeError(known_missing[1])
        attempt = 0
        while True:
            try:
                return self._registry.get_schema(schema_id)
            except SchemaRegistryError as exc:
                if exc.http_status_code == 404:
                    reason = f"schema id {schema_id} not found in the registry: {exc}"
                    self._missing[schema_id] = (self._clock() + self.MISSING_TTL_S, reason)
                    raise DecodeError(reason) from exc
                failure: Exception = exc
            except Exception as exc:  # noqa: BLE001 - connection, TLS, timeout: whatever the HTTP layer raises
                failure = exc
            reason = f"Schema Registry unavailable fetching schema id {schema_id}: {type(failure).__name__}: {failure}"
            if self._on_unavailable == "dead_letter":
                raise DecodeError(reason) from failure
            if self._on_unavailable == "fail":
                raise RegistryUnavailable(reason) from failure
            delay = min(self._backoff_s * 2 ** min(attempt, 16), self._max_backoff_s)
            log.warning("%s; retry %d (until it answers) in %.2fs", reason, attempt + 1, delay)
            self._sleep(delay)
            attempt += 1

    def __call__(self, value: bytes | None) -> dict[str, Any]:
        if not value or len(value) < _WIRE_HEADER.size:
            raise DecodeError("value too short for Schema Registry wire format")
        magic, schema_id = _WIRE_HEADER.unpack_from(value)
        if magic != WIRE_MAGIC:
            raise DecodeError(f"unknown magic byte {magic} (expected Schema Registry wire format)")
        writer, reader = self._resolved(schema_id)
        try:
            return _read_exact(value, _WIRE_HEADER.size, writer, reader)
        except DecodeError as exc:
            raise DecodeError(f"writer schema id {schema_id}: {exc}") from exc.__cause__


def make_decoder(schema_path: Path, kafka: KafkaSettings) -> Decoder:
    """The decoder a pipeline config asks for (Schema Registry wire format when a registry is configured)."""
    schema = load_schema(schema_path)
    if kafka.schema_registry_url:
        return RegistryDecoder.from_settings(kafka, schema)
    return LocalSchemaDecoder(schema)


def encode_wire(schema_id: int, schema: Schema, record: dict[str, Any]) -> bytes:
    """Serialize a record in Schema Registry wire format (for producers and tests)."""
    buffer = io.BytesIO()
    buffer.write(_WIRE_HEADER.pack(WIRE_MAGIC, schema_id))
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()
