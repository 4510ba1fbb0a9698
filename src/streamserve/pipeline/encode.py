"""Avro encoding of predictions and the headers that travel with them."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from streamserve.config import InputSettings
from streamserve.pipeline.decode import load_schema
from streamserve.records import Event, Headers, ModelOutputs

HEADER_MODEL_NAME = "streamserve.model.name"
HEADER_MODEL_VERSION = "streamserve.model.version"
HEADER_SOURCE_TOPIC = "streamserve.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.source.offset"


class PredictionEncoder:
    """Turns a batch's model outputs into (key, Avro value, headers) triples, one per event.

    Values are written column by column (see ``ColumnWriter``): a field that is the same for the whole
    batch (model name and version, prediction time) is encoded once, numeric columns in numpy, and each
    record is one ``bytes.join`` of its parts; schemas it does not cover are written by fastavro.
    """

    def __init__(self, schema_path: Path, input_settings: InputSettings) -> None:
        self.schema = load_schema(schema_path)
        self._key_field = input_settings.key_field
        self._id_field = input_settings.event_id_field
        self._time_field = input_settings.event_time_field
        self._writer = ColumnWriter.compile(self.schema)

    def encode(
        self,
        events: Sequence[Event],
        outputs: ModelOutputs,
        model_name: str,
        model_version: str,
        degraded: bool = False,
    ) -> list[tuple[bytes, bytes, Headers]]:
        """Encode one record per event; outputs are aligned with events."""
        n = len(events)
        if not n:
            return []
        sources = [event.source for event in events]
        keys = [str(event.fields[self._key_field]) for event in events]
        if self._time_field:
            field = self._time_field
            event_times = [_epoch_ms(event.fields[field]) for event in events]
        else:
            event_times = [source.timestamp_ms for source in sources]
        topics = [source.topic for source in sources]
        constants: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "prediction_time": int(time.time() * 1000),
            "degraded": degraded,
        }
        columns: dict[str, Any] = {
            "event_id": [str(event.fields[self._id_field]) for event in events],
            "key": keys,
            "score": outputs.score,
            "label": outputs.label if outputs.label is not None else [None] * n,
            "event_time": event_times,
            "source_partition": [source.partition for source in sources],
            "source_offset": [source.offset for source in sources],
        }
        if len(set(topics)) == 1:
            constants["source_topic"] = topics[0]
        else:
            columns["source_topic"] = topics
        if self._writer is not None:
            values = self._writer.write(n, constants, columns)
        else:
            values = self._write_with_fastavro(n, constants, columns)
        name_header, version_header = model_name.encode(), model_version.encode()
        common: dict[tuple[str, int], Headers] = {}  # every header but the offset, per source partition
        encoded = []
        for source, key, value in zip(sources, keys, values, strict=True):
            base = common.get((source.topic, source.partition))
            if base is None:
                base = common[(source.topic, source.partition)] = [
                    (HEADER_MODEL_NAME, name_header),
                    (HEADER_MODEL_VERSION, version_header),
                    (HEADER_SOURCE_TOPIC, source.topic.encode()),
                    (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
                ]
            encoded.append((key.encode(), value, [*base, (HEADER_SOURCE_OFFSET, str(source.offset).encode())]))
        return encoded

    def _write_with_fastavro(self, n: int, constants: dict[str, Any], columns: dict[str, Any]) -> list[bytes]:
        lists = {
            name: column.tolist() if isinstance(column, np.ndarray) else column for name, column in columns.items()
        }
        values = []
        buffer = io.BytesIO()
        for row in range(n):
            buffer.seek(0)
            buffer.truncate()
            record = {**constants, **{name: column[row] for name, column in lists.items()}}
            fastavro.schemaless_writer(buffer, self.schema, record)
            values.append(buffer.getvalue())
        return values


def _epoch_ms(value: Any) -> int:
    """Epoch milliseconds of an int or of a datetime (fastavro decodes timestamp-millis to an aware datetime)."""
    if isinstance(value, int):
        return value
    if value.tzinfo is not None:
        return (value - _EPOCH) // _ONE_MS  # exact, unlike float seconds
    return int(value.timestamp() * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


# ---------------------------------------------------------------------------------------------------------
# Column-wise Avro binary encoding (https://avro.apache.org/docs/current/specification/#binary-encoding)

_SMALL_VARINTS = [bytes([(i << 1) ^ (i >> 63)]) for i in range(64)]
"""Zigzag varints of 0..63: one byte each (string lengths, labels, partitions)."""


def _varint(value: int) -> bytes:
    """Zigzag varint of one int/long."""
    if 0 <= value < 64:
        return _SMALL_VARINTS[value]
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_column(values: Any) -> list[bytes]:
    """Zigzag varints of a column of ints, computed in numpy for the whole column."""
    ints = np.asarray(values, dtype=np.int64)
    if not len(ints):
        return []
    if ints.min() >= 0 and ints.max() < 64:  # labels, partitions: one byte each
        small = _SMALL_VARINTS
        return [small[i] for i in ints.tolist()]
    rest = ((ints << 1) ^ (ints >> 63)).view(np.uint64)
    width = max(1, (int(rest.max()).bit_length() + 6) // 7)
    groups = np.empty((len(ints), width), dtype=np.uint8)
    lengths = np.ones(len(ints), dtype=np.int64)
    seven = np.uint64(7)
    for k in range(width):
        low = (rest & np.uint64(0x7F)).astype(np.uint8)
        rest = rest >> seven
        more = rest != 0
        groups[:, k] = low | (more.astype(np.uint8) << 7)
        lengths += more
    buffer = groups.tobytes()
    return [
        buffer[start : start + length]
        for start, length in zip(range(0, len(buffer), width), lengths.tolist(), strict=True)
    ]


def _bytes_column(values: Sequence[bytes]) -> list[bytes]:
    small = _SMALL_VARINTS
    return [small[len(data)] + data if len(data) < 64 else _varint(len(data)) + data for data in values]


def _string_column(values: Sequence[str]) -> list[bytes]:
    return _bytes_column([value.encode() for value in values])


def _fixed_column(values: Any, dtype: str, width: int) -> list[bytes]:
    buffer = np.asarray(values, dtype=dtype).tobytes()
    return [buffer[start : start + width] for start in range(0, len(buffer), width)]


def _boolean_column(values: Sequence[Any]) -> list[bytes]:
    return [b"\x01" if value else b"\x00" for value in values]


_PRIMITIVE_COLUMNS: dict[str, Any] = {
    "null": lambda values: [b""] * len(values),
    "boolean": _boolean_column,
    "int": _varint_column,
    "long": _varint_column,
    "float": lambda values: _fixed_column(values, "<f4", 4),
    "double": lambda values: _fixed_column(values, "<f8", 8),
    "string": _string_column,
    "bytes": _bytes_column,
}
_LOGICAL_LONGS = {"timestamp-millis", "timestamp-micros", "local-timestamp-millis", "local-timestamp-micros"}


def _primitive(schema: Any) -> str | None:
    """The primitive type an Avro field type is written as, or None when column writing does not cover it."""
    if isinstance(schema, str):
        return schema if schema in _PRIMITIVE_COLUMNS else None
    if isinstance(schema, dict) and schema.get("type") in _PRIMITIVE_COLUMNS:
        logical = schema.get("logicalType")
        if logical is None or (logical in _LOGICAL_LONGS and schema["type"] == "long"):
            return str(schema["type"])
    return None


class _Field:
    """How one record field is written: a primitive, or a union of null and a primitive."""

    def __init__(self, name: str, schema: Any, default: Any) -> None:
        self.name = name
        self.default = default
        self.null_index: int | None = None
        self.value_index = 0
        if isinstance(schema, list):
            if len(schema) != 2 or "null" not in schema:
                raise _Unsupported(f"union {schema}")
            self.null_index = schema.index("null")
            self.value_index = 1 - self.null_index
            schema = schema[self.value_index]
        primitive = _primitive(schema)
        if primitive is None:
            raise _Unsupported(f"type {schema}")
        self.primitive = primitive

    def column(self, values: Any) -> list[bytes]:
        """The encoded values of a column (ints, floats, strings, numpy arrays; None in nullable fields)."""
        write = _PRIMITIVE_COLUMNS[self.primitive]
        if self.null_index is None:
            return write(values)
        if isinstance(values, np.ndarray):
            return [_SMALL_VARINTS[self.value_index] + part for part in write(values)]
        nulls = [value is None for value in values]
        present = write([value for value in values if value is not None])
        null, tag = _SMALL_VARINTS[self.null_index], _SMALL_VARINTS[self.value_index]
        parts = iter(present)
        return [null if is_null else tag + next(parts) for is_null in nulls]

    def constant(self, value: Any) -> bytes:
        """The encoded value of a field that is the same for every record of a batch."""
        return self.column([value])[0]


class _Unsupported(Exception):
    """A schema feature the column writer leaves to fastavro."""


class ColumnWriter:
    """Writes Avro records of a flat schema (primitives, nullable primitives, timestamp logical types) from
    columns, byte-for-byte as fastavro's schemaless_writer does."""

    def __init__(self, fields: list[_Field]) -> None:
        self.fields = fields

    @classmethod
    def compile(cls, schema: Any) -> ColumnWriter | None:
        """A writer for a parsed record schema, or None when the schema needs fastavro."""
        if not isinstance(schema, dict) or schema.get("type") != "record":
            return None
        try:
            return cls([_Field(f["name"], f["type"], f.get("default", _NO_DEFAULT)) for f in schema["fields"]])
        except _Unsupported:
            return None

    def write(self, n: int, constants: dict[str, Any], columns: dict[str, Any]) -> list[bytes]:
        """n records; each field's value comes from `constants` (one value), `columns` (n values) or its default."""
        parts: list[Any] = []
        pending = b""  # adjacent constant fields are joined once per batch
        for field in self.fields:
            if field.name in columns:
                if pending:
                    parts.append(repeat(pending, n))
                    pending = b""
                parts.append(field.column(columns[field.name]))
            elif field.name in constants:
                pending += field.constant(constants[field.name])
            elif field.default is not _NO_DEFAULT:
                pending += field.constant(field.default)
            else:
                raise ValueError(f"no value for field {field.name!r} of the output schema")
        if pending:
            parts.append(repeat(pending, n))
        join = b"".join
        return [join(record) for record in zip(*parts, strict=False)]


_NO_DEFAULT = object()


def finite_rows(outputs: ModelOutputs) -> np.ndarray:
    """Boolean mask of rows whose score is a finite number."""
    return np.isfinite(outputs.score)


def decode_prediction(schema: fastavro.types.Schema, value: bytes) -> dict[str, object]:
    """Read one prediction record (for tools and tests)."""
    record = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    assert isinstance(record, dict)
    return record
