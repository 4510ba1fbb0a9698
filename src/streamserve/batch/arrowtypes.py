"""Avro schemas as Arrow types: what a file's column must be to hold an Avro field, and the type it is read as.

An input column is accepted when its Arrow type holds the field's values without reinterpretation (integers for
``int``/``long``, integers or floats for ``float``/``double``, text for ``string`` and enums, a timestamp or epoch
milliseconds for ``timestamp-millis``, structs for records, lists for arrays, maps for maps); it is then cast to
the field's own type, safely, so a value that does not fit (2**40 into an ``int``, 1.5 into a ``long``) is
caught, never truncated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

EPOCH_MS = pa.int64()
"""timestamp-millis as the worker's decoder reads it: epoch milliseconds."""
_MILLIS = frozenset({"timestamp-millis", "local-timestamp-millis"})
_MICROS = frozenset({"timestamp-micros", "local-timestamp-micros"})


class Unsupported(ValueError):
    """An Avro construct that has no column form here (a union of two non-null types)."""


def named_types(schema: Any) -> dict[str, Any]:
    """Every named type (record, enum, fixed) of a JSON schema by full and short name."""
    found: dict[str, Any] = {}

    def walk(node: Any, namespace: str) -> None:
        if isinstance(node, list):
            for branch in node:
                walk(branch, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "enum", "fixed"):
                name = str(node["name"])
                space = node.get("namespace", namespace) if "." not in name else name.rsplit(".", 1)[0]
                found[name.rsplit(".", 1)[-1]] = node
                found[f"{space}.{name.rsplit('.', 1)[-1]}" if space else name] = node
                for field in node.get("fields", []):
                    walk(field["type"], space)
            elif kind in ("array", "map"):
                walk(node.get("items", node.get("values")), namespace)
            elif isinstance(kind, (dict, list)):
                walk(kind, namespace)

    walk(schema, "")
    return found


def resolve(node: Any, named: Mapping[str, Any]) -> Any:
    """The schema node with a named reference replaced by its definition; ``{"type": "x"}`` for a primitive."""
    if isinstance(node, str):
        return named.get(node, {"type": node})
    if isinstance(node, dict) and isinstance(node.get("type"), (dict, list)):
        return resolve(node["type"], named)
    return node


def nullable(node: Any) -> tuple[Any, bool]:
    """(the non-null branch, whether null is allowed) of a field type; Unsupported for wider unions."""
    if isinstance(node, list):
        others = [branch for branch in node if branch != "null"]
        if len(others) != 1:
            raise Unsupported(f"a union of {len(others)} non-null types has no column form")
        return others[0], len(others) < len(node)
    return node, node == "null"


def arrow_type(node: Any, named: Mapping[str, Any], millis: pa.DataType = EPOCH_MS) -> pa.DataType:
    """The Arrow type of an Avro type (``millis``: what timestamp-millis becomes, epoch ms by default)."""
    node = resolve(nullable(node)[0], named)
    kind, logical = node.get("type"), node.get("logicalType")
    if kind == "record":
        return pa.struct([_field(f, named, millis) for f in node["fields"]])
    if kind == "array":
        return pa.list_(_item(node["items"], named, millis))
    if kind == "map":
        return pa.map_(pa.string(), _item(node["values"], named, millis))
    if logical == "decimal":
        return pa.decimal128(int(node["precision"]), int(node.get("scale", 0)))
    if logical in _MILLIS and kind == "long":
        return millis
    if logical in _MICROS and kind == "long":
        return pa.timestamp("us", tz="UTC")
    if logical == "date" and kind == "int":
        return pa.date32()
    simple = _SIMPLE.get(kind)
    if simple is None:
        raise Unsupported(f"Avro type {kind!r} has no column form")
    return simple(node)


def _field(field: Mapping[str, Any], named: Mapping[str, Any], millis: pa.DataType) -> pa.Field:
    return pa.field(field["name"], arrow_type(field["type"], named, millis), nullable=nullable(field["type"])[1])


def _item(node: Any, named: Mapping[str, Any], millis: pa.DataType) -> pa.Field:
    return pa.field("item", arrow_type(node, named, millis), nullable=nullable(node)[1])


_SIMPLE: dict[str, Callable[[Mapping[str, Any]], pa.DataType]] = {
    "null": lambda _: pa.null(),
    "boolean": lambda _: pa.bool_(),
    "int": lambda _: pa.int32(),
    "long": lambda _: pa.int64(),
    "float": lambda _: pa.float32(),
    "double": lambda _: pa.float64(),
    "string": lambda _: pa.string(),
    "enum": lambda _: pa.string(),
    "bytes": lambda _: pa.binary(),
    "fixed": lambda node: pa.binary(int(node["size"])),
}


def arrow_schema(schema: Any, millis: pa.DataType = EPOCH_MS) -> pa.Schema:
    """The Arrow schema of an Avro record schema (JSON form), one column per field."""
    named = named_types(schema)
    return pa.schema([_field(f, named, millis) for f in resolve(schema, named)["fields"]])


def holds(source: pa.DataType, target: pa.DataType) -> bool:
    """A column of type ``source`` holds values of an Avro field read as ``target`` (before the safe cast)."""
    if pa.types.is_dictionary(source):
        return holds(source.value_type, target)
    for family, accepted in _FAMILIES:
        if family(target):
            return any(check(source) for check in accepted)
    if pa.types.is_struct(target):
        return pa.types.is_struct(source)
    if pa.types.is_map(target):
        return pa.types.is_map(source)
    if pa.types.is_list(target):
        return pa.types.is_list(source) or pa.types.is_large_list(source)
    return bool(source == target)


_FAMILIES: tuple[tuple[Callable[[pa.DataType], bool], tuple[Callable[[pa.DataType], bool], ...]], ...] = (
    (pa.types.is_integer, (pa.types.is_integer,)),
    (pa.types.is_floating, (pa.types.is_integer, pa.types.is_floating)),
    (pa.types.is_boolean, (pa.types.is_boolean,)),
    (pa.types.is_string, (pa.types.is_string, pa.types.is_large_string)),
    (pa.types.is_binary, (pa.types.is_binary, pa.types.is_large_binary)),
    (pa.types.is_fixed_size_binary, (pa.types.is_fixed_size_binary,)),
    (pa.types.is_decimal, (pa.types.is_decimal,)),
    (pa.types.is_date, (pa.types.is_date,)),
    (pa.types.is_timestamp, (pa.types.is_timestamp,)),
)
