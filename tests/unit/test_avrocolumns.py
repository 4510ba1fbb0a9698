"""Column-wise Avro writer: every row byte-identical to fastavro's schemaless_writer, or an error naming the field.

Hypothesis generates columns of every value the schema admits (nulls in unions, NaN/inf/-0.0, int64 extremes,
unicode with astral characters and NUL, empty maps, datetimes) for both prediction schemas and for generated
record schemas of the supported subset; fastavro writes the same rows one record at a time. Columns come as
lists, numpy arrays, scalars shared by every row, or not at all (the field's default).
"""

from __future__ import annotations

import contextlib
import io
import json
import string
import struct
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamserve.pipeline.avrocolumns import ColumnWriter, Constant, MapRows, chunks, scalars
from streamserve.pipeline.avrocolumns import writer as writer_module
from streamserve.pipeline.decode import load_schema

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
PREDICTION_SCHEMAS = ["prediction.avsc", "maintenance_prediction.avsc"]
PROPERTIES = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BROAD_PROPERTIES = settings(PROPERTIES, max_examples=150)  # generated schemas: the widest space
MAX_ROWS = 9
MISSING = object()

LONGS = st.integers(-(2**63), 2**63 - 1)
INTS = st.integers(-(2**31), 2**31 - 1)
REALS = st.floats() | st.integers(-(2**80), 2**80)  # NaN payloads, +-inf, -0.0, subnormals, big ints
EDGE_TEXT = st.sampled_from(["", "\x00", "𝄞\x00é", "a" * 300])
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12) | EDGE_TEXT  # no lone surrogates
ZONES = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=11))])
AWARE = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=ZONES)
NAIVE = st.datetimes(min_value=datetime(1900, 1, 2), max_value=datetime(2200, 1, 1))


def _fastavro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def _rows(columns: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The record dict fastavro gets for each row: a numpy column's row value is `column.tolist()[i]`."""
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name, column in columns.items():
        if isinstance(column, Constant):
            values = [column.value] * n
        elif isinstance(column, MapRows):
            values = column.rows()
        elif isinstance(column, np.ndarray):
            values = column.tolist()
        elif isinstance(column, list):
            values = column
        else:
            values = [column] * n
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return rows


def assert_matches_fastavro(schema: Any, columns: dict[str, Any], n: int) -> None:
    """Both paths write fastavro's bytes: the column path, and the row path wherever it takes the values."""
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    expected = [_fastavro(schema, row) for row in _rows(columns, n)]
    with mock.patch.object(writer_module, "ROWS_BELOW", 0):
        written = writer.write(columns, n)
    assert len(written) == n
    for i, (ours, theirs) in enumerate(zip(written, expected, strict=True)):
        assert ours == theirs, f"column path, row {i}: {_rows(columns, n)[i]!r}"
    assert_row_path_matches_or_declines(writer, columns, n, expected)


def assert_row_path_matches_or_declines(writer: ColumnWriter, columns: dict[str, Any], n: int, expected: Any) -> None:
    """The row path writes exactly the expected bytes or raises (then write() takes the column path)."""
    try:
        by_rows = writer._write_rows(columns, n)
    except scalars._NotPlain:
        return  # declined: the column path decides
    for i, (ours, theirs) in enumerate(zip(by_rows, expected, strict=True)):
        assert ours == theirs, f"row path, row {i}: {_rows(columns, n)[i]!r}"


# Generated types of the supported subset: (schema node, strategy of one admissible value, numpy dtype or None)

Leaf = tuple[Any, st.SearchStrategy[Any], str | None]


def _leaves(tag: str) -> list[Leaf]:
    symbols = ["A", "B_1", "c"]
    return [
        ("null", st.none(), None),
        ("boolean", st.booleans(), "bool"),
        ("int", INTS, "int64"),
        ("long", LONGS, "int64"),
        ("float", REALS, "float64"),
        ("double", REALS, "float64"),
        ("string", TEXT, "str"),
        ("bytes", st.binary(max_size=10), None),
        ({"type": "enum", "name": f"Enum{tag}", "symbols": symbols}, st.sampled_from(symbols), None),
        ({"type": "fixed", "name": f"Fixed{tag}", "size": 3}, st.binary(min_size=3, max_size=3), None),
        ({"type": "long", "logicalType": "timestamp-millis"}, LONGS | AWARE | NAIVE, "int64"),
        ({"type": "long", "logicalType": "timestamp-micros"}, LONGS | AWARE | NAIVE, "int64"),
        ({"type": "long", "logicalType": "local-timestamp-millis"}, LONGS | AWARE | NAIVE, "int64"),
        ({"type": "int", "logicalType": "date"}, INTS | st.dates() | st.dates().map(date.isoformat), "int64"),
        ({"type": "int", "logicalType": "time-millis"}, INTS | st.times(), "int64"),
        ({"type": "long", "logicalType": "time-micros"}, LONGS | st.times(), "int64"),
        ({"type": "string", "logicalType": "uuid"}, st.uuids() | TEXT, "str"),
        ({"type": "int", "logicalType": "made-up"}, INTS, "int64"),
    ]


@st.composite
def field_types(draw: st.DrawFn, tag: str) -> Leaf:
    """A field type: a leaf, a map or array of a non-null leaf, or either of those in a union with null."""
    leaves = _leaves(tag)
    node, values, dtype = draw(st.sampled_from(leaves))
    shape = draw(st.sampled_from(["leaf", "map", "array"]))
    if shape != "leaf" and node != "null":
        items = st.dictionaries(TEXT, values, max_size=4) if shape == "map" else st.lists(values, max_size=4)
        node, values, dtype = {"type": shape, ("values" if shape == "map" else "items"): node}, items, None
    if node != "null" and draw(st.booleans()):
        node = ["null", node] if draw(st.booleans()) else [node, "null"]
        values, dtype = st.none() | values, None
    return node, values, dtype


@st.composite
def columns_for(draw: st.DrawFn, values: st.SearchStrategy[Any], dtype: str | None, n: int) -> Any:
    """One field's column: a list, a numpy array, a scalar shared by every row, or a Constant."""
    form = draw(st.sampled_from(["list", "list", "numpy", "scalar", "constant"]))
    if form == "scalar":
        value = draw(values)
        return value if not isinstance(value, list | tuple) else Constant(value)
    if form == "constant":
        return Constant(draw(values))
    column = draw(st.lists(values, min_size=n, max_size=n))
    if form == "numpy" and dtype is not None:
        try:
            array = np.array(column, dtype=dtype)
        except (OverflowError, TypeError, ValueError):
            return column
        if array.tolist() == column or dtype == "float64":  # ints beyond 2**53 make float64 rows differ: fine
            return array
    return column


@st.composite
def generated_batches(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], int]:
    n = draw(st.integers(1, MAX_ROWS))
    fields, columns = [], {}
    for index in range(draw(st.integers(1, 6))):
        node, values, dtype = draw(field_types(str(index)))
        field: dict[str, Any] = {"name": f"f{index}", "type": node}
        if node == "null" or (isinstance(node, list) and node[0] == "null"):
            if draw(st.booleans()):
                field["default"] = None
        elif node in ("boolean", "int", "string") and draw(st.booleans()):
            field["default"] = draw(values)
        fields.append(field)
        if ("default" in field or "null" in node) and draw(st.integers(0, 4)) == 0:
            continue  # no column: fastavro writes the default
        columns[field["name"]] = draw(columns_for(values, dtype, n))
    schema = {"type": "record", "name": "Generated", "namespace": "test", "fields": fields}
    return schema, columns, n


@BROAD_PROPERTIES
@given(batch=generated_batches(), scatter=st.booleans())
def test_generated_schemas_match_fastavro(batch: tuple[dict[str, Any], dict[str, Any], int], scatter: bool) -> None:
    schema, columns, n = batch
    with mock.patch.object(chunks, "_PADDING_FACTOR", -1 if scatter else chunks._PADDING_FACTOR):
        assert_matches_fastavro(fastavro.parse_schema(schema), columns, n)


# The prediction schemas, field by field

PREDICTION_VALUES: dict[str, tuple[st.SearchStrategy[Any], str | None]] = {
    "event_id": (st.none() | TEXT, None),
    "key": (st.none() | TEXT, None),
    "model_name": (TEXT, None),
    "model_version": (TEXT, None),
    "score": (st.floats(), "float64"),
    "label": (st.none() | LONGS, None),
    "event_time": (st.none() | LONGS | AWARE, None),
    "prediction_time": (LONGS | AWARE, "int64"),
    "source_topic": (TEXT, None),
    "source_partition": (INTS, "int64"),
    "source_offset": (LONGS, "int64"),
    "degraded": (st.booleans(), "bool"),
    "predicted_class": (st.none() | TEXT, None),
    "probabilities": (st.none() | st.dictionaries(TEXT, st.floats(), max_size=4), None),
    "outputs": (st.none() | st.dictionaries(TEXT, REALS, max_size=3), None),
    "site": (st.none() | TEXT, None),
    "machine_model": (st.sampled_from(["PUMP_A", "TURBINE"]) | TEXT, None),
}


@st.composite
def prediction_batches(draw: st.DrawFn, schema: Any, max_rows: int = MAX_ROWS) -> tuple[dict[str, Any], int]:
    n = draw(st.integers(1, max_rows))
    columns = {}
    for field in schema["fields"]:
        if ("default" in field or "null" in field["type"]) and draw(st.integers(0, 5)) == 0:
            continue
        values, dtype = PREDICTION_VALUES[field["name"]]
        columns[field["name"]] = draw(columns_for(values, dtype, n))
    return columns, n


@pytest.mark.parametrize("schema_file", PREDICTION_SCHEMAS)
@PROPERTIES
@given(data=st.data())
def test_prediction_schemas_match_fastavro(schema_file: str, data: st.DataObject) -> None:
    schema = load_schema(SCHEMAS / schema_file)
    columns, n = data.draw(prediction_batches(schema))
    assert_matches_fastavro(schema, columns, n)


PLAIN_PREDICTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.none() | TEXT,
    "key": st.none() | TEXT,
    "model_name": TEXT,
    "model_version": TEXT,
    "score": st.floats(),
    "label": st.none() | LONGS,
    "event_time": st.none() | LONGS,
    "prediction_time": LONGS,
    "source_topic": TEXT,
    "source_partition": INTS,
    "source_offset": LONGS,
    "degraded": st.booleans(),
    "predicted_class": st.none() | TEXT,
    "probabilities": st.none() | st.dictionaries(TEXT, st.floats(), max_size=4),
    "outputs": st.none() | st.dictionaries(TEXT, st.floats(), max_size=3),
    "site": st.none() | TEXT,
    "machine_model": TEXT,
}


@pytest.mark.parametrize("schema_file", PREDICTION_SCHEMAS)
@PROPERTIES
@given(data=st.data())
def test_the_row_path_writes_plain_predictions(schema_file: str, data: st.DataObject) -> None:
    """What the encoder hands over (lists of str, int, float, bool, None, dict) takes the row path, and its bytes
    are fastavro's: a row path that declined everything would pass the tests above without ever being used."""
    schema = load_schema(SCHEMAS / schema_file)
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    n = data.draw(st.integers(1, MAX_ROWS))
    columns = {
        field["name"]: data.draw(st.lists(PLAIN_PREDICTION_VALUES[field["name"]], min_size=n, max_size=n))
        for field in schema["fields"]
    }
    columns["model_name"] = "fraud"  # shared scalars come as they are
    expected = [_fastavro(schema, row) for row in _rows(columns, n)]
    assert writer._write_rows(columns, n) == expected
    with mock.patch.object(writer_module, "_assemble", side_effect=AssertionError("the column path was taken")):
        assert writer.write(columns, n) == expected


# Whatever a column holds, the writer matches fastavro or raises, never writes other bytes

ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.binary(max_size=4) | st.datetimes(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3),
    max_leaves=6,
)


@PROPERTIES
@given(data=st.data())
def test_any_value_matches_fastavro_or_raises(data: st.DataObject) -> None:
    schema_file = data.draw(st.sampled_from(PREDICTION_SCHEMAS))
    schema = load_schema(SCHEMAS / schema_file)
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    columns, n = data.draw(prediction_batches(schema, max_rows=4))
    field = data.draw(st.sampled_from([field["name"] for field in schema["fields"]]))
    columns[field] = data.draw(st.lists(ANYTHING, min_size=n, max_size=n))
    error = None
    try:
        written = writer.write(columns, n)
    except (ValueError, TypeError) as exc:
        error = str(exc)
    if error is not None:
        assert field in error
        with pytest.raises(scalars._NotPlain):  # the row path declines, it writes nothing
            writer._write_rows(columns, n)
    else:
        expected = [_fastavro(schema, row) for row in _rows(columns, n)]
        assert written == expected
        assert_row_path_matches_or_declines(writer, columns, n, expected)


# Constants, errors, unsupported schemas


def test_a_shared_scalar_is_encoded_once_and_equals_its_column() -> None:
    schema = load_schema(SCHEMAS / "prediction.avsc")
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    n = 3
    common = {"event_id": ["a", "b", None], "key": None, "score": np.array([0.1, 0.2, 0.3]), "event_time": None}
    shared = {"model_name": "m", "model_version": "v1", "prediction_time": 1_700_000_000_000, "source_topic": "t"}
    shared |= {"source_partition": 2, "source_offset": 7, "probabilities": {"a": 1.0}}
    as_columns = {name: [value] * n for name, value in shared.items()}
    assert writer.write(common | shared, n) == writer.write(common | as_columns, n)
    assert writer.write(common | shared, n) == writer.write(common | shared, n)  # cached constants
    assert_matches_fastavro(schema, common | shared, n)
    fresh = ColumnWriter.for_schema(schema)
    assert fresh is not None
    encoders = {field.name: field.encoder for field in fresh._fields}
    with contextlib.ExitStack() as patches:
        calls = {
            name: patches.enter_context(mock.patch.object(encoders[name], "encode", wraps=encoders[name].encode))
            for name in shared
        }
        fresh.write(common | {name: Constant(value) for name, value in shared.items()}, n)
        fresh.write(common | shared | {"source_partition": np.int64(2), "prediction_time": np.array(1)}, n)
    for name, spy in calls.items():
        assert all(len(call.args[0]) == 1 for call in spy.call_args_list), name  # one row, not n
    assert calls["model_name"].call_count == 1  # then cached
    assert calls["probabilities"].call_count == 2  # dicts are not cached
    assert calls["prediction_time"].call_count == 2  # 1_700_000_000_000, then 1


def test_a_constant_list_for_an_array_field() -> None:
    schema = {"type": "record", "name": "R", "fields": [{"name": "xs", "type": {"type": "array", "items": "long"}}]}
    assert_matches_fastavro(schema, {"xs": Constant([1, -2, 2**40])}, 3)
    assert_matches_fastavro(schema, {"xs": [[], [1], [2, 3]]}, 3)


def test_an_empty_batch() -> None:
    writer = ColumnWriter.for_schema(load_schema(SCHEMAS / "prediction.avsc"))
    assert writer is not None
    assert writer.write({}, 0) == []


def _one_field(node: Any, default: Any = MISSING) -> dict[str, Any]:
    field: dict[str, Any] = {"name": "the_field", "type": node}
    if default is not MISSING:
        field["default"] = default
    return {"type": "record", "name": "R", "fields": [{"name": "ok", "type": "long"}, field]}


@pytest.mark.parametrize(
    ("node", "column"),
    [
        ("long", [True]),
        ("long", [1.5]),
        ("long", [2**63]),
        ("long", np.array([2**63], dtype=np.uint64)),
        ("long", np.array([1.0])),
        ("int", [2**31]),
        ("int", np.array([-(2**31) - 1])),
        ("double", ["1.5"]),
        ("double", [True]),
        ("double", np.array([True])),
        ("double", [2**1100]),
        ("float", [None]),
        ("string", [None]),
        ("string", [b"bytes"]),
        ("string", [5]),
        ("string", ["\ud800"]),
        ("boolean", [1]),
        ("bytes", ["text"]),
        ("null", [0]),
        ({"type": "enum", "name": "E", "symbols": ["A"]}, ["B"]),
        ({"type": "fixed", "name": "F", "size": 2}, [b"abc"]),
        ({"type": "long", "logicalType": "timestamp-millis"}, [date(2020, 1, 1)]),
        ({"type": "long", "logicalType": "timestamp-millis"}, np.array(["2020-01-01"], dtype="datetime64[ms]")),
        ({"type": "int", "logicalType": "date"}, ["not a date"]),
        (["null", "string"], [1]),
        (["null", "string"], [("string", "x")]),
        (["null", {"type": "map", "values": "double"}], [{1: 1.0}]),
        (["null", {"type": "map", "values": "double"}], [{"a": "1"}]),
        (["null", {"type": "map", "values": "double"}], [[1.0]]),
        (["null", {"type": "array", "items": "long"}], [(1, 2)]),
        ({"type": "array", "items": "long"}, [{"a": 1}]),
    ],
)
def test_an_inadmissible_value_raises_naming_the_field(node: Any, column: Any) -> None:
    writer = ColumnWriter.for_schema(_one_field(node))
    assert writer is not None
    columns = {"ok": list(range(len(column))), "the_field": column}
    with pytest.raises((ValueError, TypeError), match="the_field"):
        writer.write(columns, len(column))
    with pytest.raises(scalars._NotPlain):  # the row path declines; the column path above names the field
        writer._write_rows(columns, len(column))


def test_a_bad_batch_shape_raises_naming_the_field() -> None:
    writer = ColumnWriter.for_schema(_one_field("string"))
    assert writer is not None
    with pytest.raises(ValueError, match="the_field"):
        writer.write({"ok": [1, 2], "the_field": ["a"]}, 2)
    with pytest.raises(ValueError, match="the_field"):
        writer.write({"ok": [1, 2]}, 2)  # no column, no default: fastavro raises too


@pytest.mark.parametrize(
    "node",
    [
        {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "int"}]},
        ["null", "string", "long"],
        ["string", "long"],
        ["null"],
        {"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2},
        {"type": "map", "values": {"type": "map", "values": "double"}},
        {"type": "array", "items": ["null", "long"]},
        {"type": "map", "values": {"type": "record", "name": "V", "fields": []}},
        ["null", {"type": "array", "items": {"type": "array", "items": "int"}}],
    ],
)
def test_an_unsupported_schema_gives_none(node: Any) -> None:
    assert ColumnWriter.for_schema(_one_field(node)) is None


def test_the_input_schemas_with_nested_records_are_unsupported() -> None:
    assert ColumnWriter.for_schema(load_schema(SCHEMAS / "machine_reading.avsc")) is None
    assert ColumnWriter.for_schema(json.loads((SCHEMAS / "card_transaction.avsc").read_text())) is not None


def test_named_types_defined_once_and_referenced_by_name() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "a", "type": {"type": "enum", "name": "Colour", "symbols": ["RED", "GREEN"]}},
            {"name": "b", "type": ["null", "Colour"]},
            {"name": "c", "type": {"type": "map", "values": "Colour"}},
        ],
    }
    columns = {"a": ["RED", "GREEN"], "b": [None, "GREEN"], "c": [{}, {"k": "RED", "é": "GREEN"}]}
    assert_matches_fastavro(fastavro.parse_schema(schema), columns, 2)


def test_datetimes_dates_and_times_convert_as_in_fastavro() -> None:
    schema = {
        "type": "record",
        "name": "R",
        "fields": [
            {"name": "ms", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
            {"name": "us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}},
            {"name": "clock", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        ],
    }
    moment = datetime(2024, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC)
    columns = {
        "ms": [moment, moment.replace(tzinfo=None), None, -1],
        "us": [moment, datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC), 0],
        "day": [date(1, 1, 1), moment, "2024-02-29", -719_162],
        "clock": [time(23, 59, 59, 999_999), time(0), 1, 86_399_999],
        "id": [uuid.UUID(int=0), uuid.uuid4(), "not-checked", string.ascii_letters],
    }
    assert_matches_fastavro(schema, columns, 4)


def test_float32_nans_take_the_column_path() -> None:
    """struct keeps a signalling NaN signalling when it narrows it from Python 3.14 on, fastavro's C cast quiets
    it: the row path leaves every NaN of a float (float32) field to the column path, which casts as fastavro."""
    signalling = struct.unpack("<d", bytes.fromhex("000000000000f47f"))[0]
    schema = _one_field("float")
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    columns = {"ok": [1, 2], "the_field": [signalling, float("nan")]}
    with pytest.raises(scalars._NotPlain):
        writer._write_rows(columns, 2)
    assert_matches_fastavro(schema, columns, 2)


MAP_VALUES = {"float64": st.floats(), "float32": st.floats(width=32), "int64": LONGS}


@pytest.mark.parametrize("schema_file", PREDICTION_SCHEMAS)
@PROPERTIES
@given(data=st.data())
def test_map_rows_match_fastavro(schema_file: str, data: st.DataObject) -> None:
    """A map column given as MapRows (same keys in every row, values as one array) writes what fastavro writes for
    the rows as dicts, on both paths: float64/float32/int64 values, no keys, repeated keys (fewer entries)."""
    schema = load_schema(SCHEMAS / schema_file)
    columns, n = data.draw(prediction_batches(schema))
    keys = tuple(data.draw(st.lists(TEXT | st.sampled_from(["0", "1"]), max_size=4)))
    dtype = data.draw(st.sampled_from(sorted(MAP_VALUES)))
    cells = data.draw(st.lists(MAP_VALUES[dtype], min_size=n * len(keys), max_size=n * len(keys)))
    field = data.draw(st.sampled_from(["probabilities", "outputs"]))
    columns[field] = MapRows(keys, np.array(cells, dtype=dtype).reshape(n, len(keys)))
    assert_matches_fastavro(schema, columns, n)


def test_map_rows_of_another_shape_or_type_raise_naming_the_field() -> None:
    writer = ColumnWriter.for_schema(load_schema(SCHEMAS / "prediction.avsc"))
    assert writer is not None
    base = {"model_name": "m", "model_version": "v", "score": [0.5, 0.5], "prediction_time": 0, "source_topic": "t"}
    base |= {"source_partition": 0, "source_offset": [1, 2], "degraded": False}
    for bad in (MapRows(("a", "b"), np.zeros((2, 3))), MapRows(("a",), np.array([[True], [False]]))):
        with pytest.raises((ValueError, TypeError), match="probabilities"):
            writer.write({**base, "probabilities": bad}, 2)
    with pytest.raises(ValueError, match="probabilities"):
        writer.write({**base, "probabilities": MapRows(("a",), np.zeros((3, 1)))}, 2)


def test_map_rows_take_the_fixed_width_path() -> None:
    """Unique text keys and float values: one numpy pass, no dict per row."""
    schema = load_schema(SCHEMAS / "prediction.avsc")
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    probabilities = MapRows(("0", "1"), np.array([[0.25, 0.75], [1.0, -0.0]], dtype=np.float32))
    columns = {"model_name": "m", "model_version": "v", "score": [0.75, 0.0], "prediction_time": 0}
    columns |= {"source_topic": "t", "source_partition": 0, "source_offset": [1, 2], "degraded": False}
    expected = [_fastavro(schema, row) for row in _rows({**columns, "probabilities": probabilities}, 2)]
    with (
        mock.patch.object(MapRows, "rows", side_effect=AssertionError("written as dicts")),
        mock.patch.object(writer_module, "ROWS_BELOW", 0),
    ):
        assert writer.write({**columns, "probabilities": probabilities}, 2) == expected
