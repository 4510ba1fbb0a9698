"""Event fields by path: ``device.os.version``, ``scores[2]``; what Avro type a path has; value conversions.

Paths are resolved against the event schema once at start, so a feature that names a missing field or an
unsupported construct (a map, a union of several non-null types, a record used as a value) is refused
before the first record, with an error naming the field. At run time a getter walks the decoded dicts and
lists; a null anywhere along the path gives ``None`` (the feature's default, or the dead-letter topic).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

from streamserve.errors import ConfigError, FieldNotFound

_SEGMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")

Path = tuple[str | int, ...]
"""A parsed path: field names (str) and array indexes (int)."""


def parse_path(text: str) -> Path:
    """``device.os.version`` -> ("device", "os", "version"); ``scores[2]`` -> ("scores", 2)."""
    parts: list[str | int] = []
    for segment in text.split("."):
        match = _SEGMENT.fullmatch(segment)
        if match is None:
            raise ConfigError(f"invalid field path {text!r}: use names joined by dots, e.g. device.os.version[0]")
        parts.append(match.group(1))
        parts.extend(int(i) for i in _INDEX.findall(match.group(2)))
    return tuple(parts)


def getter(text: str) -> Callable[[dict[str, Any]], Any]:
    """A function reading the path from a decoded event; None when the path crosses a null or ends early."""
    path = parse_path(text)
    if len(path) == 1:
        name = path[0]
        return lambda fields: fields.get(name)  # type: ignore[arg-type]

    def get(fields: dict[str, Any]) -> Any:
        value: Any = fields
        for part in path:
            if value is None:
                return None
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                return None
        return value

    return get


# --- the Avro types a path can have --------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldType:
    """What a path holds: a kind (see KINDS), whether it may be null, and for arrays the items' type."""

    kind: str
    nullable: bool = False
    items: FieldType | None = None
    symbols: tuple[str, ...] = ()
    """Enum symbols."""
    logical: str | None = None
    """Timestamps: the logical type (timestamp-millis, timestamp-micros...)."""

    @property
    def numeric(self) -> bool:
        """Values that become a number without a vocabulary."""
        return self.kind in NUMERIC_KINDS


NUMERIC_KINDS = frozenset({"int", "float", "boolean", "decimal", "timestamp", "date", "time"})
SCALAR_KINDS = NUMERIC_KINDS | {"string", "enum", "bytes"}
"""Kinds a feature, key or id may read; records, arrays and maps are containers (arrays: vector features)."""


def resolve(schema: Any, path_text: str) -> FieldType:
    """The type of a path in an Avro record schema (JSON form); ConfigError naming the field otherwise."""
    named: dict[str, Any] = {}
    node = _type_of(schema, named)
    nullable = False
    walked = ""
    for part in parse_path(path_text):
        node_nullable, node = _unwrap(node, named, path_text, walked or "(event)")
        nullable |= node_nullable
        if isinstance(part, int):
            if node.get("type") != "array":
                raise ConfigError(f"field {path_text!r}: {walked} is not an array, it cannot be indexed")
            node = _type_of(node["items"], named)
            nullable = True  # an array may be shorter than the index
            walked += f"[{part}]"
            continue
        if node.get("type") != "record":
            raise ConfigError(f"field {path_text!r}: {walked or 'the event'} is not a record, it has no field {part!r}")
        field = next((f for f in node["fields"] if f["name"] == part), None)
        if field is None:
            names = [f["name"] for f in node["fields"]]
            raise FieldNotFound(f"field {path_text!r}: {walked or 'the event'} has no field {part!r} (fields: {names})")
        node = _type_of(field["type"], named)
        walked = f"{walked}.{part}" if walked else part
    node_nullable, node = _unwrap(node, named, path_text, walked)
    return _field_type(node, nullable or node_nullable, named, path_text)


def _type_of(node: Any, named: dict[str, Any]) -> Any:
    """Normalise a type to a dict or a list (union), registering and expanding named types."""
    if isinstance(node, str):
        return _named_type(node, named)
    if isinstance(node, dict):
        if isinstance(node.get("type"), (dict, list)) and "name" not in node:
            return _type_of(node["type"], named)
        _register_inner(node, named)
        return node
    if isinstance(node, list):
        for branch in node:
            _type_of(branch, named)
        return node
    raise ConfigError(f"unreadable Avro type {node!r}")


def _named_type(name: str, named: dict[str, Any]) -> Any:
    """A type given by name: a named type seen so far (by full name, else by its short name), or a primitive."""
    if name in named:
        return named[name]
    short = name.rsplit(".", 1)[-1]
    for full, definition in named.items():
        if full.rsplit(".", 1)[-1] == short:
            return definition
    return {"type": name}


def _register_inner(node: dict[str, Any], named: dict[str, Any]) -> None:
    """Register a named type (record, enum, fixed) and the named types inside a record, array or map."""
    kind = node.get("type")
    if kind in ("record", "enum", "fixed") and "name" in node:
        name, namespace = node["name"], node.get("namespace")
        full = name if "." in name or not namespace else f"{namespace}.{name}"
        named.setdefault(full, node)
        if kind == "record":
            for field in node.get("fields", []):
                _type_of(field["type"], named)
    elif kind == "array":
        _type_of(node["items"], named)
    elif kind == "map":
        _type_of(node["values"], named)


def _unwrap(node: Any, named: dict[str, Any], path_text: str, walked: str) -> tuple[bool, Any]:
    """(nullable, the non-null branch) of a ["null", T] union; other unions are refused."""
    if not isinstance(node, list):
        return False, node
    branches = [_type_of(b, named) for b in node]
    others = [b for b in branches if b.get("type") != "null"]
    if len(others) != 1:
        kinds = [b.get("type") for b in branches]
        raise ConfigError(f'field {path_text!r}: {walked} is a union of {kinds}; only ["null", T] unions are supported')
    return len(others) < len(branches), others[0]


def _field_type(node: dict[str, Any], nullable: bool, named: dict[str, Any], path_text: str) -> FieldType:
    avro_type, logical = node.get("type"), node.get("logicalType")
    if avro_type == "null":
        return FieldType("null", True)
    if avro_type in ("bytes", "fixed"):
        return FieldType("decimal" if logical == "decimal" else "bytes", nullable)
    if avro_type in ("int", "long"):
        kinds = {"date": "date", "time-millis": "time", "time-micros": "time"}
        if logical in kinds:
            return FieldType(kinds[logical], nullable)
        if logical and "timestamp" in logical:
            return FieldType("timestamp", nullable, logical=logical)
        return FieldType("int", nullable)
    if avro_type in ("float", "double"):
        return FieldType("float", nullable)
    if avro_type == "boolean":
        return FieldType("boolean", nullable)
    if avro_type == "string":
        return FieldType("string", nullable, logical=logical)  # uuid: how `streamserve init` finds an event id
    if avro_type == "enum":
        return FieldType("enum", nullable, symbols=tuple(node.get("symbols", ())))
    if avro_type == "array":
        items_nullable, items = _unwrap(_type_of(node["items"], named), named, path_text, f"{path_text}[]")
        return FieldType("array", nullable, items=_field_type(items, items_nullable, named, path_text))
    if avro_type in ("record", "map"):
        return FieldType(avro_type, nullable)
    raise ConfigError(f"field {path_text!r}: Avro type {avro_type!r} is not supported")


def leaf_fields(schema: Any, max_depth: int = 8) -> list[tuple[str, FieldType]]:
    """Every path of the event a feature, key or id may read, nested records walked, with its type (paths whose
    type is not supported, such as unions of several types, are left out)."""
    named: dict[str, Any] = {}
    found: list[tuple[str, FieldType]] = []

    def walk(node: Any, prefix: str, depth: int) -> None:
        try:
            _, node = _unwrap(_type_of(node, named), named, prefix, prefix)
        except ConfigError:
            return
        if node.get("type") == "record" and depth < max_depth:
            for field in node.get("fields", []):
                walk(field["type"], f"{prefix}.{field['name']}" if prefix else field["name"], depth + 1)
            return
        if prefix:
            try:
                found.append((prefix, resolve(schema, prefix)))
            except ConfigError:
                return

    walk(schema, "", 0)
    return found


def fits_feature(found: FieldType, spec: Any) -> bool:
    """Whether a field of this type feeds the feature as it is declared without parsing (a number from a number,
    a category from a single value, a vector from an array of numbers)."""
    if spec.length is not None:
        return found.kind == "array" and found.items is not None and found.items.numeric
    if spec.categorical:
        return found.kind in SCALAR_KINDS
    return found.numeric


# --- conversions --------------------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_DATE = date(1970, 1, 1)
_ONE_MS = timedelta(milliseconds=1)


def epoch_ms(value: Any) -> int | None:
    """Epoch milliseconds of an event time: an int (already ms), an aware or naive (UTC) datetime, a date."""
    if value is None or isinstance(value, bool):
        return None if value is None else int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return (value - _EPOCH) // _ONE_MS  # exact, unlike float seconds
    if isinstance(value, date):
        return (value - _EPOCH_DATE).days * 86_400_000
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    raise TypeError(f"cannot read {type(value).__name__} {value!r} as an event time")


_EPOCH_NAIVE = datetime(1970, 1, 1)
_MILLIS_EPOCHS = {"timestamp-millis": _EPOCH, "local-timestamp-millis": _EPOCH_NAIVE}
"""The decoder reads these as epoch ms (pipeline/decode.py); fastavro's datetimes count from these epochs."""


def millis_timestamp(schema: Any | None, text: str) -> str | None:
    """The logical type of a timestamp-millis or local-timestamp-millis path (read as epoch ms), else None."""
    if schema is None:
        return None
    try:
        logical = resolve(schema, text).logical
    except ConfigError:
        return None  # check_event_schema refuses such a path at start; it is read as whatever is there
    return logical if logical in _MILLIS_EPOCHS else None


def text_getter(text: str, schema: Any | None) -> Callable[[dict[str, Any]], Any]:
    """getter(), except that a timestamp-millis path gives the datetime fastavro would have read.

    For ids, keys, categories and copied fields: they render (isoformat, str.format) and are written as
    they were before the decoder read timestamp-millis as epoch ms. Numbers and event times need no datetime.
    ``schema`` (the event schema, JSON form) None: the plain getter.
    """
    get = getter(text)
    logical = millis_timestamp(schema, text)
    if logical is None:
        return get
    epoch = _MILLIS_EPOCHS[logical]

    def get_moment(fields: dict[str, Any]) -> Any:
        value = get(fields)
        if type(value) is not int:
            return value
        try:
            return epoch + timedelta(milliseconds=value)
        except OverflowError as exc:
            raise ValueError(f"{logical} {value} is outside years 1-9999") from exc

    return get_moment


def to_number(value: Any) -> float:
    """The number a feature value stands for: timestamps in epoch ms, dates in days, times in ms of the day."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return float(epoch_ms(value) or 0)
    if isinstance(value, date):
        return float((value - _EPOCH_DATE).days)
    if isinstance(value, time):
        return float(((value.hour * 60 + value.minute) * 60 + value.second) * 1000 + value.microsecond / 1000)
    if isinstance(value, bytes):
        return float(value.decode())
    if isinstance(value, str):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not a number")


def to_text(value: Any) -> str:
    """The string a categorical value stands for (enum symbols and strings as they are)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()  # UnicodeDecodeError (a ValueError) rejects the record
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, Decimal, UUID)):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a category")
        return repr(value)
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a category")


def render_id(value: Any) -> str | None:
    """An event id or key as text (None stays None); never raises, whatever the value."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float):
        return repr(value)
    try:
        return to_text(value)
    except (TypeError, ValueError):
        return str(value)


# --- start-time checks --------------------------------------------------------------------------------------


def check_event_schema(schema: Any, settings: Any) -> None:
    """Refuse, before the first record, every field the pipeline reads that the event schema cannot give.

    ``settings`` is a PipelineSettings (typed loosely to keep this module free of the config import).
    """
    problems = event_schema_problems(schema, settings)
    if problems:
        raise ConfigError(problems[0])


def event_schema_problems(schema: Any, settings: Any) -> list[str]:
    """One line per field the pipeline reads that the event schema cannot give (check_event_schema raises the
    first; ``streamserve check`` prints them all)."""
    problems: list[str] = []
    inp = settings.input
    for role, path in (("input.key_field", inp.key_field), ("input.event_id_field", inp.event_id_field)):
        try:
            kind = resolve(schema, path).kind
        except ConfigError as exc:
            problems.append(f"{role}: {exc}")
            continue
        if kind not in SCALAR_KINDS:
            problems.append(f"{role} {path!r} is an Avro {kind}; it must be a single value (string, number...)")
    if inp.event_time_field:
        try:
            kind = resolve(schema, inp.event_time_field).kind
        except ConfigError as exc:
            problems.append(f"input.event_time_field: {exc}")
        else:
            if kind not in ("timestamp", "date", "int"):
                problems.append(
                    f"input.event_time_field {inp.event_time_field!r} is an Avro {kind}; use a"
                    " timestamp-millis/micros, date, or long (epoch ms) field"
                )
    for spec in settings.features:
        try:
            _check_feature(schema, spec)
        except ConfigError as exc:
            problems.append(str(exc))
    for name, path in settings.output.copy_fields.items():
        try:
            resolve(schema, path)  # the output schema decides whether the value fits; the path must exist
        except ConfigError as exc:
            problems.append(f"output.copy_fields.{name}: {exc}")
    return problems


def _check_feature(schema: Any, spec: Any) -> None:
    """Refuse a feature whose event field (or Redis key field) the event schema cannot give as it is read."""
    if spec.source == "redis":
        for path in _template_fields(spec.key or ""):
            kind = resolve(schema, path).kind
            if kind not in SCALAR_KINDS:
                raise ConfigError(f"feature {spec.name!r}: key field {path!r} is an Avro {kind}, not a value")
        return
    where = f"feature {spec.name!r}: field {spec.field!r}"
    try:
        found = resolve(schema, spec.field)
    except FieldNotFound as exc:
        fitting = [path for path, kind in leaf_fields(schema) if fits_feature(kind, spec)]
        what = "vector" if spec.length is not None else f"dtype {spec.dtype}"
        hint = f"fields that fit a {what} feature: {', '.join(fitting[:12])}" if fitting else "no field fits it"
        missing = re.sub(r" \(fields: .*\)$", "", str(exc).split(": ", 1)[1])
        raise ConfigError(f"{where} is not in the event schema ({missing}); {hint}") from exc
    if spec.length is not None:
        if found.kind != "array" or found.items is None or not found.items.numeric:
            raise ConfigError(f"{where} is an Avro {found.kind}; a vector feature (length) needs numbers")
    elif spec.categorical:
        if found.kind not in SCALAR_KINDS:
            raise ConfigError(f"{where} is an Avro {found.kind}; a categorical feature needs a single value")
    elif found.kind == "enum":
        raise ConfigError(
            f"{where} is an enum {list(found.symbols)[:5]}: declare dtype: string (with a string model input,"
            " or encoding ordinal/onehot and a vocabulary)"
        )
    elif found.kind == "array":
        raise ConfigError(f"{where} is an array: give `length` for a vector feature or pick an element, e.g. x[0]")
    elif not found.numeric and found.kind != "string":
        raise ConfigError(f"{where} is an Avro {found.kind}, which cannot be read as a number")


def _template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]
