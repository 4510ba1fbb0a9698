"""The rows of a file (an Arrow record batch) as the worker's events: its decode step for files.

Once per file the columns are checked against the input Avro schema (a missing field without a default, a column
whose type cannot hold the field's values: one line naming the file and the column). Per batch, each column is cast
to the field's own Arrow type (safely: a value that does not fit rejects its row, it is never truncated), rows that
break the schema where Arrow cannot say it (a null where the field is not nullable, a text that is not one of an
enum's symbols) are rejected at the decode stage with the field named, and the others become events exactly as
the worker's decoder makes them: dicts of Python values, timestamp-millis as epoch milliseconds.

Columns of the file that the schema does not have are left out, except the ones named like a Redis feature the
job reads from the file instead (``carried``): those travel in the event under the feature's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any
from uuid import UUID

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamserve.batch.arrowtypes import Unsupported, arrow_type, holds, named_types, nullable, resolve
from streamserve.errors import BatchInputError
from streamserve.pipeline.process import DECODE_STAGE
from streamserve.records import Event, Rejected, Source

_NUMERIC = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
_NEW: Any = tuple.__new__
"""A named tuple from the tuple of its fields (what its ``_make`` does), called from C by map()."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a batch's rows come from: the file (a source topic), its number (a partition) and its first row."""

    name: str
    index: int
    first_row: int
    timestamp_ms: int
    """Stands for the Kafka timestamp of each row (the event time when the input has no event_time_field)."""


@dataclass(slots=True)
class _Column:
    """One input column: the schema field it fills and the type it is read as."""

    name: str
    node: Any
    target: pa.DataType
    default: Any
    has_default: bool


class RowReader:
    """Reads record batches of files as events of the input schema (plus carried feature columns)."""

    def __init__(self, event_schema: Mapping[str, Any], carried: Sequence[str] = ()) -> None:
        self._named = named_types(event_schema)
        record = resolve(dict(event_schema), self._named)
        self._columns: list[_Column] = []
        for field in record["fields"]:
            try:
                target = arrow_type(field["type"], self._named)
            except Unsupported as exc:
                raise BatchInputError("the input schema", str(exc), field["name"]) from exc
            self._columns.append(
                _Column(field["name"], field["type"], target, field.get("default"), "default" in field)
            )
        self.carried = tuple(carried)

    def check(self, schema: pa.Schema, path: object) -> None:
        """Raise BatchInputError (file and column named) when the file's columns cannot hold the input schema."""
        for column in self._columns:
            if column.name not in schema.names:
                if not column.has_default and not nullable(column.node)[1]:
                    raise BatchInputError(
                        path, "missing: the input schema needs this field (it has no default)", column.name
                    )
                continue
            problem = _mismatch(schema.field(column.name).type, column.node, self._named, column.name)
            if problem is not None:
                raise BatchInputError(path, problem, column.name)
        for name in self.carried:
            if (
                name in schema.names
                and not any(check(schema.field(name).type) for check in _NUMERIC)
                and not (holds(schema.field(name).type, pa.string()))
            ):
                raise BatchInputError(
                    path, f"a feature column must hold numbers or text, not {schema.field(name).type}", name
                )

    def events(self, batch: pa.RecordBatch, origin: Origin) -> tuple[list[Event], list[Rejected]]:
        """The batch's rows as events, and the rows that break the input schema rejected (decode stage)."""
        n = batch.num_rows
        reasons: list[str | None] = [None] * n
        names: list[str] = []
        columns: list[list[Any]] = []
        for column in self._columns:
            converted = _cast(_column_of(batch, column), column, reasons)
            for mask, reason in _row_problems(converted, column.node, self._named, column.name):
                for row in np.flatnonzero(mask).tolist():
                    reasons[row] = reasons[row] or reason
            values = _python(converted)
            if _is_uuid(column.node, self._named):
                values = _uuids(values, column.name, reasons)
            names.append(column.name)
            columns.append(values)
        for name in self.carried:
            names.append(name)
            columns.append(_python(batch.column(name)) if name in batch.schema.names else [None] * n)
        # A column at a time above; here one dict, one Source and one Event per row, as the worker's decoder makes
        # them, built by C loops (map): no Python frame per row.
        rows = zip(*columns, strict=True) if columns else repeat((), n)  # no fields: an empty record per row
        fields = list(map(dict, map(zip, repeat(names, n), rows)))
        first = origin.first_row
        per_row = zip(
            repeat(origin.name, n),
            repeat(origin.index, n),
            range(first, first + n),
            repeat(None, n),
            repeat(None, n),
            repeat(None, n),
            repeat(origin.timestamp_ms, n),
            strict=True,
        )
        sources: list[Source] = list(map(_NEW, repeat(Source, n), per_row))
        if reasons.count(None) == n:
            return list(map(_NEW, repeat(Event, n), zip(sources, fields, strict=True))), []
        events: list[Event] = []
        rejected: list[Rejected] = []
        for source, problem, record in zip(sources, reasons, fields, strict=True):
            if problem is None:
                events.append(Event(source, record))
            else:
                rejected.append(Rejected(source, DECODE_STAGE, "BatchInputError", problem))
        return events, rejected


def _column_of(batch: pa.RecordBatch, column: _Column) -> pa.Array:
    """The file's column of a field, or the field's default (null when it has none) on every row."""
    if column.name in batch.schema.names:
        return batch.column(column.name)
    return (
        pa.array([column.default] * batch.num_rows, type=column.target)
        if column.default is not None
        else (pa.nulls(batch.num_rows, column.target))
    )


def _cast(array: pa.Array, column: _Column, reasons: list[str | None]) -> pa.Array:
    """The column as the field's type; a value that does not fit (overflow, truncation) rejects its row."""
    if pa.types.is_timestamp(array.type):  # whole milliseconds, as an Avro timestamp-millis writer keeps them
        array = pc.cast(array, pa.timestamp("ms", tz=array.type.tz), safe=False).cast(pa.int64())
    if array.type == column.target:
        return array
    try:
        return array.cast(column.target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass  # some rows' values: found below, row by row
    pieces = []
    for row in range(len(array)):
        try:
            pieces.append(array.slice(row, 1).cast(column.target))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            reasons[row] = reasons[row] or f"field {column.name}: {exc}"
            pieces.append(pa.nulls(1, column.target))
    return pa.concat_arrays(pieces) if pieces else pa.nulls(0, column.target)


def _is_uuid(node: Any, named: Mapping[str, Any]) -> bool:
    inner = resolve(nullable(node)[0], named)
    return inner.get("type") == "string" and inner.get("logicalType") == "uuid"


def _uuids(texts: list[Any], name: str, reasons: list[str | None]) -> list[Any]:
    """A uuid field's texts as the UUIDs fastavro decodes; a text that is no UUID rejects its row."""
    out: list[Any] = []
    for row, text in enumerate(texts):
        try:
            out.append(None if text is None else UUID(text))
        except ValueError:
            reasons[row] = reasons[row] or f"field {name}: {text!r} is not a UUID"
            out.append(None)
    return out


def _python(array: pa.Array) -> list[Any]:
    """The column's values as the worker's decoder gives them (maps as dicts): numbers and text through numpy,
    many times faster than one Arrow scalar per value, with the same Python values."""
    kind = array.type
    if array.null_count == 0 and any(check(kind) for check in _NUMERIC):
        return list(array.to_numpy(zero_copy_only=False).tolist())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return list(array.to_numpy(zero_copy_only=False).tolist())  # None where null
    return array.to_pylist(maps_as_pydicts="lossy") if _has_map(kind) else array.to_pylist()


def _has_map(kind: pa.DataType) -> bool:
    if pa.types.is_map(kind):
        return True
    if pa.types.is_struct(kind):
        return any(_has_map(kind.field(i).type) for i in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _has_map(kind.value_type)
    return False


def _mismatch(source: pa.DataType, node: Any, named: Mapping[str, Any], path: str = "") -> str | None:
    """Why a column of type ``source`` cannot hold the field (a nested field named by its path), or None."""
    inner = resolve(nullable(node)[0], named)
    target = arrow_type(inner, named)
    millis = inner.get("type") == "long" and inner.get("logicalType") in ("timestamp-millis", "local-timestamp-millis")
    if millis and (pa.types.is_timestamp(source) or pa.types.is_integer(source)):
        return None  # a timestamp column, or epoch milliseconds already
    if not holds(source, target):
        where = f" at {path}" if "." in path or "[" in path else ""  # a nested field: its whole path
        return f"type {source}{where} cannot hold the schema's {_avro_name(inner)}"
    if pa.types.is_struct(target):
        names = [source.field(i).name for i in range(source.num_fields)]
        for field in inner["fields"]:
            child = f"{path}.{field['name']}"
            if field["name"] not in names:
                if "default" in field or nullable(field["type"])[1]:
                    continue
                return f"has no field {child} (the input schema needs it)"
            problem = _mismatch(source.field(names.index(field["name"])).type, field["type"], named, child)
            if problem is not None:
                return problem
    if pa.types.is_list(target) or pa.types.is_map(target):
        items = source.value_type if pa.types.is_list(source) or pa.types.is_large_list(source) else source.item_type
        return _mismatch(items, inner.get("items", inner.get("values")), named, f"{path}[]")
    return None


def _avro_name(node: Mapping[str, Any]) -> str:
    logical = node.get("logicalType")
    return f"{node['type']} ({logical})" if logical else str(node["type"])


def _row_problems(array: pa.Array, node: Any, named: Mapping[str, Any], path: str) -> Iterator[tuple[Any, str]]:
    """(rows mask, reason) of each way rows break the schema that the cast does not catch: nulls where the
    field is not nullable, enum values that are not symbols; nested fields' problems mapped to their rows."""
    inner, allows_null = nullable(node)
    inner = resolve(inner, named)
    if not allows_null and array.null_count:
        yield (
            array.is_null().to_numpy(zero_copy_only=False),
            f"field {path} is null; the input schema does not allow null",
        )
    kind = inner.get("type")
    if kind == "enum" and len(array):
        symbols = pa.array(inner["symbols"], pa.string())
        unknown = pc.and_kleene(array.is_valid(), pc.invert(pc.is_in(array, value_set=symbols)))
        if pc.any(unknown).as_py():
            yield unknown.to_numpy(zero_copy_only=False), f"field {path}: not a symbol of enum {inner['name']}"
    elif kind == "record":
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        for i, field in enumerate(inner["fields"]):
            for mask, reason in _row_problems(array.field(i), field["type"], named, f"{path}.{field['name']}"):
                yield mask & valid, reason
    elif kind in ("array", "map"):
        entries = pc.list_flatten(array)
        items = entries if kind == "array" else entries.field(1)  # a map's entries are (key, value) structs
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        for mask, reason in _row_problems(items, inner.get("items", inner.get("values")), named, f"{path}[]"):
            rows = np.zeros(len(array), dtype=bool)
            rows[parents[mask]] = True
            yield rows, reason
