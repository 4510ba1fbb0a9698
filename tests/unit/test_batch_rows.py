"""batch.rows: a file's rows as the worker's events. Any mix of good and bad rows: each row is an event or a
decode reject with its field named, exactly once; good rows read back exactly as the worker's decoder reads them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.batch.rows import Origin, RowReader
from streamserve.errors import BatchInputError
from streamserve.pipeline.decode import LocalSchemaDecoder

SCHEMA = json.loads((Path(__file__).parents[2] / "src/streamserve/schemas/machine_reading.avsc").read_text())
ORIGIN = Origin("readings.parquet", 0, 100, 0)
FILE_TYPES = pa.schema(
    [
        ("reading_id", pa.string()),
        ("machine_id", pa.string()),
        ("site", pa.string()),
        (
            "machine",
            pa.struct(
                [("model", pa.string()), ("firmware", pa.struct([("major", pa.int64()), ("minor", pa.int64())]))]
            ),
        ),
        ("mode", pa.dictionary(pa.int32(), pa.string())),
        ("temperature_c", pa.float64()),
        ("pressure_bar", pa.float64()),
        ("vibration_rms", pa.list_(pa.float64())),
        ("load_pct", pa.decimal128(5, 2)),
        ("event_time", pa.timestamp("ms", tz="UTC")),
    ]
)


def good_row(i: int, draw: Any) -> dict[str, Any]:
    from decimal import Decimal

    return {
        "reading_id": f"00000000-0000-0000-0000-{i:012d}",
        "machine_id": f"m{i}",
        "site": draw(st.sampled_from([None, "north", "south"])),
        "machine": {"model": draw(st.sampled_from(["PUMP_A", "TURBINE"])), "firmware": {"major": 2, "minor": i % 7}},
        "mode": draw(st.sampled_from(["IDLE", "PEAK", "MAINTENANCE"])),
        "temperature_c": draw(st.sampled_from([None, 61.5])),
        "pressure_bar": 1.5,
        "vibration_rms": [0.25, 0.5, 1.0, 2.0],
        "load_pct": Decimal("42.50"),
        "event_time": draw(st.sampled_from([None, 1_700_000_000_123])),
    }


BREAKS = {
    "machine_id": (lambda row: row.update(machine_id=None), "field machine_id is null"),
    "model": (lambda row: row["machine"].update(model="ROCKET"), "field machine.model: not a symbol of enum"),
    "minor": (lambda row: row["machine"]["firmware"].update(minor=2**40), "field machine"),
    "vibration": (lambda row: row.update(vibration_rms=[0.5, None]), "field vibration_rms[] is null"),
    "pressure": (lambda row: row.update(pressure_bar=None), "field pressure_bar is null"),
}


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_every_row_is_an_event_or_a_decode_reject_exactly_once(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 30))
    plan = [data.draw(st.sampled_from([None, *BREAKS])) for _ in range(count)]
    rows = []
    for i, broken in enumerate(plan):
        row = good_row(i, data.draw)
        if broken is not None:
            BREAKS[broken][0](row)
        rows.append(row)
    file_rows = [{**r, "event_time": None if r["event_time"] is None else r["event_time"]} for r in rows]
    table = pa.Table.from_pylist(file_rows, schema=FILE_TYPES.set(9, pa.field("event_time", pa.int64())))
    reader = RowReader(SCHEMA)
    reader.check(table.schema, "readings.parquet")
    events, rejected = reader.events(table.to_batches()[0], ORIGIN)

    offsets = sorted([e.source.offset for e in events] + [r.source.offset for r in rejected])
    assert offsets == list(range(100, 100 + count)), "each row once"
    for reject in rejected:
        broken = plan[reject.source.offset - 100]
        assert broken is not None
        assert reject.stage == "decode"
        assert BREAKS[broken][1] in reject.message
    decoder = LocalSchemaDecoder(fastavro.parse_schema(SCHEMA))
    for event in events:
        original = rows[event.source.offset - 100]
        assert plan[event.source.offset - 100] is None
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, fastavro.parse_schema(SCHEMA), {**original})
        assert event.fields == decoder(buffer.getvalue()), "the event the worker's decoder reads"


def test_a_column_of_the_wrong_type_or_missing_is_one_line_naming_it() -> None:
    reader = RowReader(SCHEMA)
    with pytest.raises(BatchInputError, match=r"^x.parquet: column 'pressure_bar': type string cannot hold"):
        reader.check(FILE_TYPES.set(6, pa.field("pressure_bar", pa.string())), "x.parquet")
    with pytest.raises(BatchInputError, match=r"^x.parquet: column 'machine_id': missing"):
        reader.check(FILE_TYPES.remove(1), "x.parquet")
    firmware = pa.struct([("model", pa.string()), ("firmware", pa.struct([("major", pa.int64())]))])
    with pytest.raises(BatchInputError, match=r"machine.firmware.minor"):
        reader.check(FILE_TYPES.set(3, pa.field("machine", firmware)), "x.parquet")
    reader.check(FILE_TYPES.remove(2), "x.parquet")  # site: nullable with a default


PRIMITIVES = {
    "type": "record",
    "name": "Primitives",
    "fields": [
        {"name": "text", "type": "string"},
        {"name": "maybe_text", "type": ["null", "string"], "default": None},
        {"name": "small", "type": "int"},
        {"name": "maybe_small", "type": ["null", "int"], "default": None},
        {"name": "big", "type": "long"},
        {"name": "real", "type": "double"},
        {"name": "maybe_real", "type": ["null", "double"], "default": None},
        {"name": "single", "type": "float"},
        {"name": "flag", "type": "boolean"},
        {"name": "maybe_flag", "type": ["null", "boolean"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}


def test_primitive_columns_read_as_the_very_values_and_types_the_decoder_gives() -> None:
    """Numbers, flags and text leave Arrow through numpy: the same Python values and types as fastavro's."""
    rows = [
        {
            "text": f"t{i}-é",
            "maybe_text": None if i % 3 == 0 else f"m{i}",
            "small": i - 5,
            "maybe_small": None if i % 2 else i,
            "big": 2**40 + i,
            "real": i / 7 if i != 4 else float("nan"),
            "maybe_real": None if i % 4 == 1 else -i / 3,
            "single": 0.5 * i,
            "flag": i % 2 == 0,
            "maybe_flag": None if i == 2 else i % 3 == 0,
            "at": 1_700_000_000_000 + i,
        }
        for i in range(9)
    ]
    table = pa.Table.from_pylist(rows)  # Arrow's own inference: int64 for int, double for float
    reader = RowReader(PRIMITIVES)
    reader.check(table.schema, "p.parquet")
    events, rejected = reader.events(table.to_batches()[0], ORIGIN)
    assert not rejected
    parsed = fastavro.parse_schema(PRIMITIVES)
    decoder = LocalSchemaDecoder(parsed)
    for event, row in zip(events, rows, strict=True):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, row)
        decoded = decoder(buffer.getvalue())
        assert isinstance(decoded, dict)
        assert {k: type(v) for k, v in event.fields.items()} == {k: type(v) for k, v in decoded.items()}
        same = {k: v == decoded[k] or (v != v and decoded[k] != decoded[k]) for k, v in event.fields.items()}
        assert all(same.values()), same
