"""The schema compiled into one encoder per field, and ColumnWriter: a batch of named columns written as one
schemaless Avro record per row, by the row path for small batches of plain values, else by the column path."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import fastavro
import numpy as np
from fastavro.logical_writers import LOGICAL_WRITERS

from streamserve.pipeline.avrocolumns.chunks import _assemble, _Chunk
from streamserve.pipeline.avrocolumns.containers import MapRows, _Blocks, _map_rows, _Nullable
from streamserve.pipeline.avrocolumns.scalars import (
    _INT_RANGE,
    _LONG_RANGE,
    _Boolean,
    _Bytes,
    _Encoder,
    _Enum,
    _Integer,
    _NotPlain,
    _Null,
    _Real,
    _String,
)

_UNSUPPORTED_LOGICAL = {"bytes-decimal", "fixed-decimal"}  # Decimal arithmetic is not mirrored here
_CONSTANT_CACHE_SIZE = 256
_CACHED_TYPES = (str, int, bool, type(None))
ROWS_BELOW = 96
"""Batches of fewer rows try the row path first: ~5-6 us per prediction row against the column path's ~0.5-0.7 ms
per batch plus ~3 us per row (`python -m bench.avrocolumns_bench 1 32 64 96 128 256`)."""


@dataclass(frozen=True, slots=True)
class Constant:
    """A value shared by every row (needed only where a list would read as a column: array fields)."""

    value: Any


def _compile(node: Any, named: Mapping[str, Any], within: str = "field") -> _Encoder | None:
    """The encoder of one schema node, or None when the node is outside the supported subset.

    `within` is where the node sits: "field" (a record field's type), "union" (the non-null branch) or
    "items" (a map's values, an array's items); unions nest in nothing, maps and arrays only in a union.
    """
    if isinstance(node, list):
        return _compile_union(node, named, within)
    if isinstance(node, str):
        if node in named:
            return _compile(named[node], named, within)
        node = {"type": node}
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        return None
    kind = node["type"]
    logical = f"{kind}-{node['logicalType']}" if node.get("logicalType") else None
    if logical in _UNSUPPORTED_LOGICAL:
        return None
    if kind in ("map", "array"):
        if within == "items":
            return None
        items = _compile(node["values" if kind == "map" else "items"], named, "items")
        return None if items is None else _Blocks(items, keyed=kind == "map")
    return _compile_simple(kind, node, LOGICAL_WRITERS.get(logical) if logical else None)


def _compile_union(node: list[Any], named: Mapping[str, Any], within: str) -> _Encoder | None:
    """The encoder of a union of null and one other type (a record field's only), or None."""
    others = [branch for branch in node if branch != "null"]
    if within != "field" or len(node) != 2 or len(others) != 1:
        return None
    inner = _compile(others[0], named, "union")
    return None if inner is None else _Nullable(inner, node[0] == "null")


def _compile_simple(kind: str, node: dict[str, Any], prepare: Callable[[Any, Any], Any] | None) -> _Encoder | None:
    """The encoder of a type that holds no other type (prepare: its logical type's writer), or None."""
    if kind in ("int", "long"):
        return _Integer(_INT_RANGE if kind == "int" else _LONG_RANGE, prepare, node)
    if kind in ("float", "double"):
        return _Real("<f4" if kind == "float" else "<f8")
    if kind == "string":
        return _String(prepare, node)
    if kind == "null":
        return _Null()
    if kind == "boolean":
        return _Boolean()
    if kind in ("bytes", "fixed"):
        return _Bytes(int(node["size"]) if kind == "fixed" else None)
    if kind == "enum":
        return _Enum(node["symbols"])
    return None


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    encoder: _Encoder
    default: tuple[Any] | None  # (value,) used for a missing column; None when fastavro raises instead


def _value_of(field: _Field, columns: Mapping[str, Any]) -> Any:
    """A field's column, or its default as a Constant; ValueError when it has neither (fastavro raises too)."""
    if field.name in columns:
        return columns[field.name]
    if field.default is not None:
        return Constant(field.default[0])
    raise ValueError(f"field {field.name!r}: no value and no default")


def _is_column(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim > 0
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview))


class ColumnWriter:
    """Writes a batch of named columns as one schemaless Avro record per row."""

    def __init__(self, fields: Sequence[_Field]) -> None:
        self._fields = tuple(fields)
        self._rows = tuple(field.encoder.row() for field in self._fields)
        self._constants: dict[tuple[str, type, Any], bytes] = {}

    @classmethod
    def for_schema(cls, schema: Any) -> ColumnWriter | None:
        """A writer for a record schema (parsed or JSON), or None when the schema is outside the subset."""
        named: dict[str, Any] = {}
        parsed = fastavro.parse_schema(schema, named)
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            return None
        fields = []
        for field in parsed["fields"]:
            encoder = _compile(field["type"], named)
            if encoder is None:
                return None
            if "default" in field:
                default: tuple[Any] | None = (field["default"],)
            else:  # fastavro writes None for a missing field whose type mentions null (its test is `in`)
                default = (None,) if "null" in field["type"] else None
            fields.append(_Field(field["name"], encoder, default))
        return cls(fields)

    def write(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        """Encode n rows; a column is an array or list of n values, anything else one value for every row."""
        if n <= 0:
            return []
        if n < ROWS_BELOW:
            try:
                return self._write_rows(columns, n)
            except _NotPlain:
                pass  # a value the row path does not write: the column path decides
        chunks: list[_Chunk] = []
        shared = bytearray()  # adjacent constant fields, written as one piece
        for field in self._fields:
            value = _value_of(field, columns)
            try:
                encoded = self._field_chunks(field, value, n)
            except (ValueError, TypeError, OverflowError) as exc:
                error = TypeError if isinstance(exc, TypeError) else ValueError
                raise error(f"field {field.name!r}: {exc}") from exc
            if isinstance(encoded, bytes):
                shared += encoded
                continue
            if shared:
                chunks.append(_Chunk.fixed(np.frombuffer(bytes(shared), dtype=np.uint8)))
                shared.clear()
            chunks.extend(encoded)
        if shared:
            chunks.append(_Chunk.fixed(np.frombuffer(bytes(shared), dtype=np.uint8)))
        buffer, lengths = _assemble(chunks, n)
        data = buffer.tobytes()
        ends = np.cumsum(lengths).tolist()
        return [data[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def _field_chunks(self, field: _Field, value: Any, n: int) -> list[_Chunk] | bytes:
        """One field's chunks for n rows; its bytes when one value is shared by every row."""
        if isinstance(value, MapRows):
            if len(value) != n:
                raise ValueError(f"column has {len(value)} values for {n} rows")
            return _map_rows(field.encoder, value)
        if isinstance(value, Constant) or not _is_column(value):
            return self._constant(field, value.value if isinstance(value, Constant) else value)
        if len(value) != n:
            raise ValueError(f"column has {len(value)} values for {n} rows")
        if isinstance(value, np.ndarray) and (value.ndim > 1 or value.dtype.kind not in "biuf"):
            if value.dtype.kind in "mMV":
                raise TypeError(f"numpy dtype {value.dtype} is not supported")
            value = value.tolist()
        return field.encoder.encode(value if isinstance(value, np.ndarray) else list(value))

    def _write_rows(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        """write() a value at a time, for plain Python values only; _NotPlain for anything else."""
        try:
            return self._rows_or_raise(columns, n)
        except _NotPlain:
            raise
        except Exception as exc:
            raise _NotPlain from exc

    def _rows_or_raise(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        pieces: list[Any] = []
        for field, write in zip(self._fields, self._rows, strict=True):
            value = _value_of(field, columns)
            if isinstance(value, MapRows):
                value = value.rows()
            elif isinstance(value, Constant) or not _is_column(value):
                pieces.append(repeat(self._constant(field, value.value if isinstance(value, Constant) else value), n))
                continue
            if len(value) != n:
                raise _NotPlain
            if isinstance(value, np.ndarray):
                if value.ndim > 1 or value.dtype.kind not in "biuf":
                    raise _NotPlain
                value = value.tolist()
            pieces.append(map(write, value))
        if not pieces:
            return [b""] * n
        return [b"".join(row) for row in zip(*pieces, strict=True)]

    def _constant(self, field: _Field, value: Any) -> bytes:
        """One field's bytes for a value shared by every row (cached for hashable values)."""
        # Only exact str/int/bool/None values are cached: equal floats can differ in bytes (-0.0, NaN payloads).
        key = (field.name, type(value), value) if type(value) in _CACHED_TYPES else None
        cached = self._constants.get(key) if key is not None else None
        if cached is not None:
            return cached
        if isinstance(value, np.ndarray | np.generic):  # as a numpy column's rows: Python values
            value = value.tolist()
        data, _ = _assemble(field.encoder.encode([value]), 1)
        encoded = data.tobytes()
        if key is not None:
            if len(self._constants) >= _CONSTANT_CACHE_SIZE:
                self._constants.clear()
            self._constants[key] = encoded
        return encoded
