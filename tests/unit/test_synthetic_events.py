"""ops/synthetic.py: events of any Avro schema that fastavro writes and reads back, honouring each type."""

from __future__ import annotations

import io
import uuid
from decimal import Decimal

import fastavro

from streamserve.ops.synthetic import ENTITIES, EventMaker

SCHEMA = {
    "type": "record",
    "name": "Everything",
    "namespace": "t",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "account_id", "type": "string"},
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": ["null", {"type": "int", "logicalType": "date"}]},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
        {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
        {"name": "level", "type": {"type": "enum", "name": "Level", "symbols": ["LOW", "HIGH"]}},
        {"name": "again", "type": "Level"},
        {"name": "either", "type": ["int", "string"]},
        {"name": "vector", "type": {"type": "array", "items": "double"}},
        {"name": "attributes", "type": {"type": "map", "values": "long"}},
        {
            "name": "inner",
            "type": [
                "null",
                {"type": "record", "name": "Inner", "fields": [{"name": "flag", "type": "boolean"}]},
            ],
        },
    ],
}


def test_every_type_is_written_and_read_back_by_fastavro() -> None:
    parsed = fastavro.parse_schema(SCHEMA)
    maker = EventMaker(SCHEMA, seed=3, unique=["event_id"], lengths={"vector": 4}, null_share=0.3)
    events = list(maker.events(200))
    for event in events:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, event)
        back = fastavro.schemaless_reader(io.BytesIO(buffer.getvalue()), parsed, None)
        assert back["event_id"] == event["event_id"]
        assert len(back["vector"]) == 4
        assert isinstance(back["price"], Decimal)
        assert back["level"] in ("LOW", "HIGH")
        uuid.UUID(event["uid"])
    assert len({e["event_id"] for e in events}) == 200, "the event id is unique"
    accounts = {e["account_id"] for e in events}
    assert accounts <= {f"account_id-{i}" for i in range(ENTITIES)}, "ids from the pool of entities"
    assert any(e["inner"] is None for e in events)
    assert any(e["inner"] is not None for e in events)
    assert {type(e["either"]) for e in events} == {int, str}, "both branches of a union"


def test_the_same_seed_gives_the_same_events() -> None:
    first = list(EventMaker(SCHEMA, seed=5).events(20))
    again = list(EventMaker(SCHEMA, seed=5).events(20))
    assert [e["price"] for e in first] == [e["price"] for e in again]
    assert [e["account_id"] for e in first] == [e["account_id"] for e in again]
