"""One fastavro read per micro-batch: it gives exactly what reading record by record gives, bad records included.

The batch is framed as an Avro array of events, each followed by a sentinel (pipeline/decode.py): a field added
to the event record, or an ``{event, sentinel}`` wrapper where that cannot be (records that contain
themselves, a field named like the sentinel). These tests hold
``decode_many`` to ``__call__`` value by value (records, and the DecodeError reasons of bad ones) on schemas
unlike the fraud demo's, and check that a batch of good records really is one read.
"""

from __future__ import annotations

import io
import json
import math
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema as RegisteredSchema
from confluent_kafka.schema_registry import SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamserve.errors import DecodeError, RegistryUnavailable
from streamserve.pipeline import decode as decode_module
from streamserve.pipeline.decode import (
    BISECT_BELOW,
    SENTINEL_FIELD,
    Decoded,
    LocalSchemaDecoder,
    RegistryDecoder,
    encode_wire,
)
from streamserve.pipeline.process import BatchProcessor, BatchResult
from streamserve.records import Source

ADDRESS = re.compile(r" at 0x[0-9a-f]+")
PROPERTIES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

READING: dict[str, Any] = {
    "type": "record",
    "name": "Reading",
    "namespace": "test.sensors",
    "fields": [
        {"name": "site", "type": ["null", "string"]},
        {"name": "mode", "type": {"type": "enum", "name": "Mode", "symbols": ["IDLE", "RUN", "STOPPED"]}},
        {"name": "previous_mode", "type": ["null", "Mode"]},
        {
            "name": "machine",
            "type": {
                "type": "record",
                "name": "Machine",
                "namespace": "test.plant",
                "fields": [
                    {"name": "serial", "type": {"type": "fixed", "name": "Serial", "size": 4}},
                    {"name": "firmware", "type": ["null", {"type": "array", "items": "int"}]},
                ],
            },
        },
        {"name": "spare", "type": ["null", "test.plant.Machine"]},
        {"name": "vibration", "type": {"type": "array", "items": "double"}},
        {"name": "counters", "type": {"type": "map", "values": "long"}},
        {"name": "at", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "local_at", "type": {"type": "long", "logicalType": "local-timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "load", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
        {"name": "reading_id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "note", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "temperature", "type": "double"},
        {"name": "ratio", "type": "float"},
        {"name": "ok", "type": "boolean"},
    ],
}
NODE: dict[str, Any] = {  # the null namespace, a named type used twice, a union of several types
    "type": "record",
    "name": "Node",
    "fields": [
        {"name": "label", "type": "string"},
        {"name": "child", "type": ["null", {"type": "record", "name": "Leaf", "fields": [{"name": "w", "type": "double"}]}]},  # noqa: E501
        {"name": "leaves", "type": {"type": "array", "items": "Leaf"}},
        {"name": "value", "type": ["null", "long", "string", "Leaf"]},
        {"name": "tags", "type": {"type": "map", "values": ["null", "string"]}},
    ],
}  # fmt: skip
TAKEN: dict[str, Any] = {  # the wrapper's own names: the batch read must not break (record by record then)
    "type": "record",
    "name": "BatchItem",
    "namespace": "io.streamserve.internal",
    "fields": [
        {"name": "e", "type": "string"},
        {"name": "s", "type": {"type": "fixed", "name": "Sentinel", "size": 8}},
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}
CHAIN: dict[str, Any] = {  # contains itself: a field added to it would be added to every link (the wrapper)
    "type": "record",
    "name": "Link",
    "namespace": "test.chain",
    "fields": [{"name": "n", "type": "long"}, {"name": "next", "type": ["null", "test.chain.Link"]}],
}
CLASH: dict[str, Any] = {  # a field named like the sentinel field (the wrapper)
    "type": "record",
    "name": "Clash",
    "fields": [{"name": SENTINEL_FIELD, "type": "string"}, {"name": "x", "type": ["null", "double"]}],
}
OTHER: dict[str, Any] = {
    "type": "record",
    "name": "Click",
    "fields": [{"name": "url", "type": "string"}, {"name": "ms", "type": "long"}, {"name": "ua", "type": "string"}],
}

MS = st.integers(-62_135_596_800_000, 253_402_300_799_999)  # epoch ms of years 1-9999
TEXT = st.text(max_size=12)  # unicode: astral characters, NUL, combining marks
DOUBLES = st.floats() | st.sampled_from([math.nan, -0.0, math.inf, 1e308])
LONGS = st.integers(-(2**63), 2**63 - 1)
MACHINES = st.fixed_dictionaries(
    {"serial": st.binary(min_size=4, max_size=4), "firmware": st.none() | st.lists(st.integers(-(2**31), 2**31 - 1))}
)
RECORDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "reading": st.fixed_dictionaries(
        {
            "site": st.none() | TEXT,
            "mode": st.sampled_from(["IDLE", "RUN", "STOPPED"]),
            "previous_mode": st.none() | st.sampled_from(["IDLE", "RUN"]),
            "machine": MACHINES,
            "spare": st.none() | MACHINES,
            "vibration": st.lists(DOUBLES, max_size=4),
            "counters": st.dictionaries(TEXT, LONGS, max_size=3),
            "at": st.none() | MS,
            "local_at": MS,
            "at_us": st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=st.just(UTC)),
            "day": st.dates(),
            "load": st.decimals(-9999, 9999, places=2, allow_nan=False, allow_infinity=False),
            "reading_id": st.uuids(),
            "note": TEXT,
            "raw": st.binary(max_size=12),
            "temperature": DOUBLES,
            "ratio": st.floats(width=32),
            "ok": st.booleans(),
        }
    ),
    "node": st.fixed_dictionaries(
        {
            "label": TEXT,
            "child": st.none() | st.fixed_dictionaries({"w": DOUBLES}),
            "leaves": st.lists(st.fixed_dictionaries({"w": DOUBLES}), max_size=3),
            "value": st.none() | LONGS | TEXT | st.fixed_dictionaries({"w": DOUBLES}),
            "tags": st.dictionaries(TEXT, st.none() | TEXT, max_size=3),
        }
    ),
    "taken": st.fixed_dictionaries({"e": TEXT, "s": st.binary(min_size=8, max_size=8), "when": MS}),
    "chain": st.recursive(
        st.fixed_dictionaries({"n": LONGS, "next": st.none()}),
        lambda inner: st.fixed_dictionaries({"n": LONGS, "next": inner}),
        max_leaves=4,
    ),
    "clash": st.fixed_dictionaries({SENTINEL_FIELD: TEXT, "x": st.none() | DOUBLES}),
}
SCHEMAS = {"reading": READING, "node": NODE, "taken": TAKEN, "chain": CHAIN, "clash": CLASH}


def avro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and -0.0 apart from 0.0; exceptions by class and message."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Exception) and isinstance(b, Exception):  # the reason, but for fastavro's buffer address
        return (type(a), ADDRESS.sub("", str(a))) == (type(b), ADDRESS.sub("", str(b)))
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return a == b
    return type(a) is type(b) and a == b


def one_by_one(decoder: Any, values: list[bytes | None]) -> list[Decoded]:
    out: list[Decoded] = []
    for value in values:
        try:
            out.append(decoder(value))
        except Exception as exc:  # noqa: BLE001 - the outcome to compare, whatever it is
            out.append(exc)
    return out


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts fastavro reads made by the decoder module."""
    calls: list[int] = []
    real = fastavro.schemaless_reader

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_module.fastavro, "schemaless_reader", counted)
    return calls


@PROPERTIES
@given(data=st.data(), name=st.sampled_from(sorted(SCHEMAS)))
def test_a_batch_of_records_is_one_read_equal_to_reading_them_one_by_one(data: st.DataObject, name: str) -> None:
    records = data.draw(st.lists(RECORDS[name], min_size=2, max_size=12))
    decoder = LocalSchemaDecoder(fastavro.parse_schema(SCHEMAS[name]))
    values: list[bytes | None] = [avro(SCHEMAS[name], record) for record in records]
    calls: list[int] = []
    real = fastavro.schemaless_reader
    decode_module.fastavro.schemaless_reader = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[assignment]
    try:
        batch = decoder.decode_many(values)
    finally:
        decode_module.fastavro.schemaless_reader = real
    assert same(batch, one_by_one(decoder, values))
    # timestamp-millis (and local-) read as the epoch ms written; everything else as fastavro reads it
    assert same(batch, [fastavro.schemaless_reader(io.BytesIO(v or b""), decoder.schema, None) for v in values])
    assert all(same(b, r) for b, r in zip(batch, records, strict=True) if name in ("node", "chain", "clash"))
    if name == "reading":
        assert [b["at"] for b in batch] == [r["at"] for r in records]  # type: ignore[index]
        assert [b["local_at"] for b in batch] == [r["local_at"] for r in records]  # type: ignore[index]
    assert len(calls) == (len(values) if name == "taken" else 1), "one read for the batch (by record: names taken)"


@st.composite
def mixed_batch(draw: st.DrawFn, name: str) -> list[bytes | None]:
    """Good records with bad values among them: random bytes, truncated, bytes over, another schema, empty."""
    schema = SCHEMAS[name]
    values: list[bytes | None] = [avro(schema, r) for r in draw(st.lists(RECORDS[name], min_size=1, max_size=8))]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["random", "truncated", "over", "other", "empty", "none"]))
        whole = avro(schema, draw(RECORDS[name]))
        bad: bytes | None = {
            "random": draw(st.binary(min_size=1, max_size=40)),
            "truncated": whole[: draw(st.integers(0, len(whole) - 1))],
            "over": whole + draw(st.binary(min_size=1, max_size=9)),
            "other": avro(OTHER, {"url": draw(TEXT), "ms": draw(LONGS), "ua": draw(TEXT)}),
            "empty": b"",
            "none": None,
        }[kind]
        values.insert(draw(st.integers(0, len(values))), bad)
    return values


@PROPERTIES
@given(data=st.data(), name=st.sampled_from(sorted(SCHEMAS)))
def test_bad_values_in_a_batch_get_exactly_their_record_by_record_outcome(data: st.DataObject, name: str) -> None:
    values = data.draw(mixed_batch(name))
    decoder = LocalSchemaDecoder(fastavro.parse_schema(SCHEMAS[name]))
    batch = decoder.decode_many(values)
    expected = one_by_one(decoder, values)
    assert same(batch, expected), [(type(b).__name__, type(e).__name__) for b, e in zip(batch, expected, strict=True)]


def test_the_sentinel_is_a_field_of_the_event_unless_the_record_contains_itself_or_has_that_field() -> None:
    forms = {name: decode_module._batch_schemas(schema)[0] for name, schema in SCHEMAS.items()}
    assert {name: form.tail for name, form in forms.items() if form is not None} == {
        "reading": True,
        "node": True,
        "chain": False,
        "clash": False,
    }
    assert forms["taken"] is None, "the wrapper's own names are taken: record by record"


def test_tombstones_among_good_records_keep_the_batch_read(reads: list[int]) -> None:
    decoder = LocalSchemaDecoder(fastavro.parse_schema(NODE))
    good = avro(NODE, {"label": "a", "child": None, "leaves": [], "value": 3, "tags": {}})
    out = decoder.decode_many([good, None, good, b"", good])
    assert len(reads) == 1
    assert [type(o).__name__ for o in out] == ["dict", "DecodeError", "dict", "DecodeError", "dict"]
    assert "empty value" in str(out[1])


def test_a_record_with_bytes_over_misaligns_the_sentinel_and_is_read_alone(reads: list[int]) -> None:
    decoder = LocalSchemaDecoder(fastavro.parse_schema(OTHER))
    good = avro(OTHER, {"url": "u", "ms": 1, "ua": "x"})
    out = decoder.decode_many([good, good + b"\x02a", good])
    assert len(reads) == 1 + 3, "the batch read, then record by record"
    assert isinstance(out[0], dict)
    assert isinstance(out[2], dict)
    assert "ends at byte" in str(out[1])


def test_only_the_sentinels_catch_values_whose_lengths_add_up() -> None:
    """16 + 4 + 4 bytes of a fixed(8) schema consume the framed buffer exactly, misaligned: the sentinels differ."""
    schema = {
        "type": "record",
        "name": "F",
        "fields": [{"name": "f", "type": {"type": "fixed", "name": "E", "size": 8}}],
    }
    decoder = LocalSchemaDecoder(fastavro.parse_schema(schema))
    values: list[bytes | None] = [bytes(range(16)), b"abcd", b"efgh", bytes(8)]
    out = decoder.decode_many(values)
    assert same(out, one_by_one(decoder, values))
    assert [type(o).__name__ for o in out] == ["DecodeError", "DecodeError", "DecodeError", "dict"]


# --- Schema Registry wire format -------------------------------------------------------------------------


V1: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "namespace": "test.shop",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "placed", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    ],
}
V2: dict[str, Any] = {  # a field added with a default, an enum symbol added
    **V1,
    "fields": [
        *V1["fields"][:2],
        {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID", "SHIPPED"]}},
        {"name": "total", "type": ["null", "double"], "default": None},
    ],
}
READER: dict[str, Any] = {
    **V1,
    "fields": [*V1["fields"], {"name": "total", "type": ["null", "double"], "default": None}],
}


def test_registry_batch_with_two_writer_versions_is_one_read_per_id(reads: list[int]) -> None:
    registry = SchemaRegistryClient.new_client({"url": "mock://streamserve-decode-batch"})
    v1 = registry.register_schema("orders-value", RegisteredSchema(json.dumps(V1), "AVRO"))
    v2 = registry.register_schema("orders-value", RegisteredSchema(json.dumps(V2), "AVRO"))
    assert v1 != v2
    decoder = RegistryDecoder(registry, fastavro.parse_schema(READER))
    p1, p2 = fastavro.parse_schema(V1), fastavro.parse_schema(V2)
    good = [
        encode_wire(v1, p1, {"id": "a", "placed": 1_700_000_000_000, "status": "NEW"}),
        encode_wire(v2, p2, {"id": "b", "placed": -5, "status": "PAID", "total": 9.5}),
        encode_wire(v1, p1, {"id": "c", "placed": 0, "status": "PAID"}),
        encode_wire(v2, p2, {"id": "d", "placed": 7, "status": "NEW", "total": None}),
    ]
    decoder.decode_many(good)  # fetch both writer schemas
    reads.clear()
    out = decoder.decode_many(good)
    assert len(reads) == 2, "one read per writer schema id"
    assert out == [
        {"id": "a", "placed": 1_700_000_000_000, "status": "NEW", "total": None},
        {"id": "b", "placed": -5, "status": "PAID", "total": 9.5},
        {"id": "c", "placed": 0, "status": "PAID", "total": None},
        {"id": "d", "placed": 7, "status": "NEW", "total": None},
    ]
    shipped = encode_wire(v2, p2, {"id": "e", "placed": 1, "status": "SHIPPED", "total": 1.0})  # unknown to the reader
    bad: list[bytes | None] = [
        good[0],
        shipped,
        b"\x00\x00",
        b"\x01" + good[1][1:],
        b"\x00" + (424242).to_bytes(4, "big") + good[1][5:],
        good[1][:-2],
        good[0] + b"\x00",
        None,
        good[1],
        good[2],
    ]
    mixed = decoder.decode_many(bad)
    assert same(mixed, one_by_one(decoder, bad))
    assert [type(o).__name__ for o in mixed] == ["dict"] + ["DecodeError"] * 7 + ["dict", "dict"]
    assert "writer schema id" in str(mixed[1])
    assert "Status" in str(mixed[1])


def test_a_writer_with_a_field_named_like_the_sentinel_is_read_in_wrappers_on_both_sides(reads: list[int]) -> None:
    registry = SchemaRegistryClient.new_client({"url": "mock://streamserve-decode-clash"})
    clashing = {**V1, "fields": [*V1["fields"], {"name": SENTINEL_FIELD, "type": "string"}]}  # dropped by the reader
    schema_id = registry.register_schema("orders-value", RegisteredSchema(json.dumps(clashing), "AVRO"))
    decoder = RegistryDecoder(registry, fastavro.parse_schema(READER))
    parsed = fastavro.parse_schema(clashing)
    values: list[bytes | None] = [
        encode_wire(schema_id, parsed, {"id": str(i), "placed": i, "status": "NEW", SENTINEL_FIELD: "x" * i})
        for i in range(5)
    ]
    decoder.decode_many(values[:1])  # fetch the writer schema
    reads.clear()
    out = decoder.decode_many(values)
    assert len(reads) == 1, "still one read for the batch"
    assert out == [{"id": str(i), "placed": i, "status": "NEW", "total": None} for i in range(5)]
    assert same(out, one_by_one(decoder, values))


class DownRegistry:
    def get_schema(self, schema_id: int) -> Any:
        raise ConnectionRefusedError(111, "Connection refused")


def test_registry_unavailable_still_stops_the_batch_under_fail_and_dead_letters_under_dead_letter() -> None:
    values: list[bytes | None] = [
        encode_wire(3, fastavro.parse_schema(V1), {"id": "a", "placed": 1, "status": "NEW"})
    ] * 3
    failing = RegistryDecoder(DownRegistry(), fastavro.parse_schema(READER), "fail")
    processor = BatchProcessor(failing, None, None, "out", "shadow")  # type: ignore[arg-type]  # decode only
    sources = [Source("in", 0, i, None, value, None, 0) for i, value in enumerate(values)]
    with pytest.raises(RegistryUnavailable):
        processor.decode_batch(sources, BatchResult())
    lenient = RegistryDecoder(DownRegistry(), fastavro.parse_schema(READER), "dead_letter")
    result = BatchResult()
    assert BatchProcessor(lenient, None, None, "o", "s").decode_batch(sources, result) == []  # type: ignore[arg-type]
    assert [r.stage for r in result.rejected] == ["decode"] * 3
    assert all("Schema Registry unavailable fetching schema id 3" in r.message for r in result.rejected)


@PROPERTIES
@given(data=st.data(), name=st.sampled_from(sorted(SCHEMAS)))
def test_a_large_batch_with_bad_values_is_narrowed_down_by_halves(data: st.DataObject, name: str) -> None:
    schema = SCHEMAS[name]
    records = data.draw(st.lists(RECORDS[name], min_size=BISECT_BELOW, max_size=3 * BISECT_BELOW))
    values: list[bytes | None] = [avro(schema, record) for record in records]
    for _ in range(data.draw(st.integers(1, 3))):
        whole = avro(schema, data.draw(RECORDS[name]))
        bad = data.draw(st.sampled_from([whole[: len(whole) // 2], whole + b"\x01\x02", b"", None]))
        values.insert(data.draw(st.integers(0, len(values))), bad)
    decoder = LocalSchemaDecoder(fastavro.parse_schema(schema))
    assert same(decoder.decode_many(values), one_by_one(decoder, values))


def test_one_bad_record_in_256_costs_a_few_reads_not_one_per_record(reads: list[int]) -> None:
    decoder = LocalSchemaDecoder(fastavro.parse_schema(NODE))
    good = avro(NODE, {"label": "n", "child": None, "leaves": [], "value": None, "tags": {}})
    values: list[bytes | None] = [good] * 256
    values[77] = good[:-1]  # truncated
    outcome = decoder.decode_many(values)
    assert isinstance(outcome[77], DecodeError)
    assert all(isinstance(record, dict) for i, record in enumerate(outcome) if i != 77)
    # one failed read per level (halves 256 -> 16), one good read beside each, then the 16 by record
    assert len(reads) <= 2 * 5 + 16, len(reads)
