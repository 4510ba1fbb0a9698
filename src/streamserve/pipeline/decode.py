"""Avro decoding of input values: a local writer schema or Confluent Schema Registry wire format.

A micro-batch is read with one fastavro call, not one per record (fastavro's per-call setup costs more than
a small record's bytes): the values are framed as one Avro array, each followed by a sentinel, 8 random bytes
per batch. The array's items are the event record with the sentinel as one more, last field (one dict per
record; ~0.6 us per record cheaper than a ``{event, sentinel}`` wrapper record, which is kept for records that
contain themselves and for a field already named like the sentinel). A value that is not exactly one valid
record makes the read fail or misaligns a sentinel; then the read is retried on the two halves, down to a few
values read one by one, so each bad record gets its own reason.
timestamp-millis fields are read as their long (epoch ms): no datetime per event (fields.py renders them).
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.types import Schema

from streamserve.config import KafkaSettings
from streamserve.errors import ConfigError, DecodeError, RegistryUnavailable

log = logging.getLogger(__name__)

WIRE_MAGIC = 0
_WIRE_HEADER = struct.Struct(">bI")
MILLIS_TIMESTAMPS = frozenset({"timestamp-millis", "local-timestamp-millis"})
"""Logical types decoded as their primitive long (epoch ms)."""
_SENTINEL_SIZE = 8
_INTERNAL_NAMESPACE = "io.streamserve.internal"

Decoded = dict[str, Any] | Exception
"""A value's record, or the exception that rejects it."""


def primitive_timestamps(schema: Any) -> Any:
    """A schema (JSON or parsed form) as JSON, with timestamp-millis and local-timestamp-millis read as longs."""
    if isinstance(schema, dict):
        return {
            key: primitive_timestamps(value)
            for key, value in schema.items()
            if key not in ("__fastavro_parsed", "__named_schemas")
            and not (key == "logicalType" and value in MILLIS_TIMESTAMPS and schema.get("type") == "long")
        }
    if isinstance(schema, list):
        return [primitive_timestamps(node) for node in schema]
    return schema


SENTINEL_FIELD = "__streamserve_sentinel"
_SENTINEL_TYPE = {"type": "fixed", "name": f"{_INTERNAL_NAMESPACE}.Sentinel", "size": _SENTINEL_SIZE}


@dataclass(frozen=True, slots=True)
class _BatchSchema:
    """The parsed schema a batch is read with, and where each record's sentinel is."""

    schema: Schema
    tail: bool
    """The sentinel is the record's last field (SENTINEL_FIELD); else items are ``{"e": event, "s": sentinel}``."""


def _takes_sentinel_field(event: Any) -> bool:
    """The record can carry the sentinel as one more field: no field of that name, and its name does not appear
    inside its fields (a record that may contain itself would get the field in its nested copies too; a field or
    doc that merely equals the name counts as well - the wrapper is still correct, only slower)."""
    if not isinstance(event, dict) or event.get("type") != "record":
        return False
    fields = event.get("fields", [])
    name = str(event["name"])
    names = {name, name.rsplit(".", 1)[-1], f"{event.get('namespace')}.{name}"}
    inner = json.dumps(fields)
    return all(f.get("name") != SENTINEL_FIELD for f in fields) and not any(f'"{each}"' in inner for each in names)


def _batch_schema(event: Any, tail: bool) -> _BatchSchema | None:
    """The schema a batch is read with: an array of the event record plus a sentinel field (tail) or of
    ``{"e": event, "s": sentinel}`` records. None when the event is not a record or the internal names are taken
    (then records are read one by one)."""
    if not isinstance(event, dict) or event.get("type") != "record":
        return None
    if tail:
        item = {**event, "fields": [*event.get("fields", []), {"name": SENTINEL_FIELD, "type": _SENTINEL_TYPE}]}
    else:
        if "." not in event["name"] and not event.get("namespace"):
            event = {**event, "namespace": ""}  # keep the event's names in the null namespace, not the wrapper's
        item = {
            "type": "record",
            "name": f"{_INTERNAL_NAMESPACE}.BatchItem",
            "fields": [{"name": "e", "type": event}, {"name": "s", "type": _SENTINEL_TYPE}],
        }
    try:
        return _BatchSchema(fastavro.parse_schema({"type": "array", "items": item}), tail)
    except (ValueError, fastavro.schema.SchemaParseException):  # a user type of an internal name: no batch reads
        return None


def _batch_schemas(writer: Any, reader: Any = None) -> tuple[_BatchSchema | None, _BatchSchema | None]:
    """The batch schemas of a writer schema and, when records are resolved, of the reader schema: both of the same
    form (the sentinel as a field when both records can take it). (None, None) when there is no batch read."""
    tail = _takes_sentinel_field(writer) and (reader is None or _takes_sentinel_field(reader))
    batch = _batch_schema(writer, tail)
    if reader is None:
        return batch, None
    batch_reader = _batch_schema(reader, tail)
    return (batch, batch_reader) if batch is not None and batch_reader is not None else (None, None)


BISECT_BELOW = 16
"""A failed batch read of at least this many values is retried as two halves; smaller ones record by record."""


_LONG = fastavro.parse_schema("long")


def _avro_count(n: int) -> bytes:
    """An Avro array block count: n as a zig-zag varint long."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, _LONG, n)
    return buffer.getvalue()


def _read_batch(
    values: Sequence[bytes | memoryview], writer: _BatchSchema, reader: _BatchSchema | None
) -> list[Decoded] | None:
    """The records of the values, read with one fastavro call (writer, reader: batch schemas of the same form);
    None unless every value is exactly one valid record."""
    sentinel = os.urandom(_SENTINEL_SIZE)
    payload = b"".join((_avro_count(len(values)), sentinel.join(values), sentinel, b"\x00"))
    buffer = io.BytesIO(payload)
    try:
        items = fastavro.schemaless_reader(buffer, writer.schema, reader.schema if reader else None)
    except Exception:  # noqa: BLE001 - some value's bytes; each value is read alone for its reason
        return None
    if buffer.tell() != len(payload) or not isinstance(items, list) or len(items) != len(values):
        return None
    if writer.tail:
        records: list[Decoded] = [item for item in items if item.pop(SENTINEL_FIELD) == sentinel]
    else:
        records = [item["e"] for item in items if item["s"] == sentinel]
    return records if len(records) == len(values) else None  # else a value with bytes over, or one read too far


def _batch_or_each(
    decode: Callable[[bytes | None], dict[str, Any]],
    values: Sequence[bytes | None],
    offset: int,
    writer: _BatchSchema | None,
    reader: _BatchSchema | None,
) -> list[Decoded]:
    """The values' records read as one batch (each from byte ``offset``); when that fails, the two halves
    apart (so one bad record costs a few reads, not one per record), down to BISECT_BELOW values read each
    by ``decode``, which gives each bad record its reason. Empty values (tombstones) always go to ``decode``.
    """
    present = [value for value in values if value]
    if writer is not None and len(present) > 1:
        records = _read_batch([memoryview(value)[offset:] if offset else value for value in present], writer, reader)
        if records is not None:
            if len(present) == len(values):
                return records
            read = iter(records)
            return [next(read) if value else _each(decode, [value])[0] for value in values]
        if len(values) >= BISECT_BELOW:
            middle = len(values) // 2
            return [
                *_batch_or_each(decode, values[:middle], offset, writer, reader),
                *_batch_or_each(decode, values[middle:], offset, writer, reader),
            ]
    return _each(decode, values)


def _each(decode: Callable[[bytes | None], dict[str, Any]], values: Sequence[bytes | None]) -> list[Decoded]:
    """Each value decoded alone: its record or the exception that rejects it."""
    out: list[Decoded] = []
    for value in values:
        try:
            out.append(decode(value))
        except RegistryUnavailable:
            raise  # the platform, not the record (kafka.schema_registry_on_unavailable=fail)
        except Exception as exc:  # noqa: BLE001 - whatever a record's bytes do, it is that record's fault
            out.append(exc)
    return out


def load_schema(path: Path) -> Schema:
    """Parse an .avsc file once, with a message naming the file when it is not valid Avro."""
    try:
        return fastavro.parse_schema(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ConfigError(f"Avro schema file not found: {path}") from exc
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise ConfigError(f"invalid Avro schema {path}: {exc}") from exc


class Decoder(Protocol):
    """Turns an input value into an event dict, or raises DecodeError; a batch of values in one go."""

    def __call__(self, value: bytes | None) -> dict[str, Any]: ...

    def decode_many(self, values: Sequence[bytes | None]) -> list[Decoded]:
        """Per value, what ``self(value)`` returns or the exception it raises (RegistryUnavailable propagates)."""
        ...

    def decodes_now(self, values: Sequence[bytes | None]) -> bool:
        """decode_many(values) needs nothing it does not hold (no Schema Registry request that could wait)."""
        ...


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
        plain = primitive_timestamps(schema)
        self.schema = fastavro.parse_schema(plain)
        self._batch, _ = _batch_schemas(plain)

    def __call__(self, value: bytes | None) -> dict[str, Any]:
        if not value:
            raise DecodeError("empty value (tombstone?)")
        return _read_exact(value, 0, self.schema, None)

    def decode_many(self, values: Sequence[bytes | None]) -> list[Decoded]:
        """Per value, its record or the exception that rejects it: one fastavro call when all are records."""
        return _batch_or_each(self, values, 0, self._batch, None)

    def decodes_now(self, values: Sequence[bytes | None]) -> bool:
        """Always: the schema is local."""
        return True


@dataclass(frozen=True, slots=True)
class _Writer:
    """A registry id's writer schema, parsed once, with what reading it takes."""

    schema: Schema
    reader: Schema | None
    """The reader schema to resolve to; None when it is the writer's."""
    batch: _BatchSchema | None
    """The batch schema of the writer (None: read record by record)."""
    batch_reader: _BatchSchema | None
    """The batch schema of the reader (None when no resolution)."""


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
        url: str | None = None,
    ) -> None:
        self._registry = registry
        self._url = url  # named in the reason of a fetch the registry did not answer
        self._on_unavailable = on_unavailable
        self._backoff_s, self._max_backoff_s = backoff_ms / 1000, max_backoff_ms / 1000
        self._capacity = cache_capacity
        self._sleep, self._clock = sleep, clock
        self._reader_plain = primitive_timestamps(reader_schema)
        self._reader = fastavro.parse_schema(self._reader_plain)
        self._writers: OrderedDict[int, _Writer] = OrderedDict()
        self._missing: dict[int, tuple[float, str]] = {}

    @classmethod
    def from_config(
        cls, registry_config: Mapping[str, str | int | float], reader_schema: Schema, **policy: Any
    ) -> RegistryDecoder:
        """A decoder backed by confluent-kafka's Schema Registry client: url (``mock://`` for tests), TLS and
        basic-auth settings as KafkaSettings.schema_registry_config() gives them."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        conf = dict(registry_config)
        return cls(SchemaRegistryClient.new_client(conf), reader_schema, url=str(conf.get("url")), **policy)

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
        """The parsed writer schema for an id (timestamp-millis as longs), fetched once."""
        return self._resolved(schema_id).schema

    def _resolved(self, schema_id: int) -> _Writer:
        """The writer schema of an id, the reader schema to resolve it to and the batch schemas of both."""
        cached = self._writers.get(schema_id)
        if cached is not None:
            self._writers.move_to_end(schema_id)
            return cached
        registered = self._fetch(schema_id)
        if (registered.schema_type or "AVRO") != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {registered.schema_type} schema, not Avro")
        try:
            plain = primitive_timestamps(json.loads(registered.schema_str))
            writer = fastavro.parse_schema(plain)
        except (ValueError, fastavro.schema.SchemaParseException) as exc:
            raise DecodeError(f"schema id {schema_id} is not a valid Avro schema: {exc}") from exc
        # The same schema (as parsed, logical types included) needs no resolution: the cheaper read.
        same = writer == self._reader
        batch, batch_reader = _batch_schemas(plain, None if same else self._reader_plain)
        resolved = _Writer(writer, None if same else self._reader, batch, batch_reader)
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
            # One line (the HTTP layer's errors are bounded by the client's timeout and retries, then land here).
            source = f" from {self._url}" if self._url else ""
            reason = " ".join(
                f"Schema Registry unavailable fetching schema id {schema_id}{source}: {type(failure).__name__}: "
                f"{failure}".split()
            )
            if self._on_unavailable == "dead_letter":
                raise DecodeError(reason) from failure
            if self._on_unavailable == "fail":
                raise RegistryUnavailable(
                    f"{reason} (kafka.schema_registry_on_unavailable=fail stops the worker; check that the registry "
                    "runs and answers at kafka.schema_registry_url)"
                ) from failure
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
        return self._read(value, schema_id, self._resolved(schema_id))

    def decodes_now(self, values: Sequence[bytes | None]) -> bool:
        """Every writer schema id of the values is known (cached, or recently answered as missing): decoding them
        makes no registry request, so it cannot wait for a registry that is down."""
        now = self._clock()
        for schema_id in {bytes(value[1 : _WIRE_HEADER.size]) for value in values if value and value[0] == WIRE_MAGIC}:
            number = int.from_bytes(schema_id, "big")
            if len(schema_id) == _WIRE_HEADER.size - 1 and number not in self._writers:
                missing = self._missing.get(number)
                if missing is None or now >= missing[0]:
                    return False
        return True

    def decode_many(self, values: Sequence[bytes | None]) -> list[Decoded]:
        """Per value, its record or the exception that rejects it: one fastavro call per writer schema id."""
        out: list[Decoded | None] = [None] * len(values)
        groups: dict[int, list[int]] = {}
        for i, value in enumerate(values):
            if value and len(value) >= _WIRE_HEADER.size and value[0] == WIRE_MAGIC:
                groups.setdefault(int.from_bytes(value[1 : _WIRE_HEADER.size], "big"), []).append(i)
            else:
                out[i] = _each(self, [value])[0]  # too short, unknown magic byte: its reason
        for schema_id, rows in groups.items():
            try:
                resolved = self._resolved(schema_id)  # RegistryUnavailable (on_unavailable=fail) propagates
            except DecodeError as exc:  # unknown id, not Avro: every record of the id, as record by record
                for i in rows:
                    out[i] = exc
                continue

            def read(value: bytes | None, schema_id: int = schema_id, resolved: _Writer = resolved) -> dict[str, Any]:
                return self._read(value, schema_id, resolved)

            group = [values[i] for i in rows]
            decoded = _batch_or_each(read, group, _WIRE_HEADER.size, resolved.batch, resolved.batch_reader)
            for i, result in zip(rows, decoded, strict=True):
                out[i] = result
        return out  # type: ignore[return-value]  # every position was filled above

    @staticmethod
    def _read(value: bytes | None, schema_id: int, resolved: _Writer) -> dict[str, Any]:
        """One wire-format record of a known id; the reason of a bad one names the id."""
        try:
            return _read_exact(value or b"", _WIRE_HEADER.size, resolved.schema, resolved.reader)
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
