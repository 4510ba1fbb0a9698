"""timestamp-millis fields decoded as epoch ms give the same features, keys, ids and predictions as datetimes did.

"Before" is the event as fastavro reads it with logical types (datetimes) through components that know no
event schema; "after" is LocalSchemaDecoder's event (epoch ms) through components given the event schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest

from streamserve.config import FeatureSpec, InputSettings
from streamserve.pipeline.decode import LocalSchemaDecoder
from streamserve.pipeline.encode import PredictionEncoder, decode_prediction
from streamserve.pipeline.features import FeatureBuilder, Replies
from streamserve.pipeline.fields import text_getter
from streamserve.records import Event, ModelOutputs, Source

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
TRIP: dict[str, Any] = {
    "type": "record",
    "name": "Trip",
    "fields": [
        {"name": "id", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "key", "type": ["null", {"type": "long", "logicalType": "local-timestamp-millis"}]},
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "cat", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "n", "type": "double"},
    ],
}
RECORDS = [
    {"id": 1_700_000_000_123, "key": 86_400_000, "when": 1_700_000_000_000, "cat": 0, "n": 1.0},
    {"id": -1, "key": None, "when": 253_402_300_799_999, "cat": None, "n": 2.0},
    {"id": -62_135_596_800_000, "key": 1, "when": 5, "cat": 1_234_567_890_999, "n": 3.0},
]
COPIES = {"when_us": "when", "when_ms": "when", "cat_ms": "cat", "local_ms": "key"}


class Keys:
    """A Redis stand-in that records the keys asked for and knows none."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, requests: Sequence[tuple[list[str] | None, list[str]]]) -> list[Replies]:
        self.asked += [keys for _, keys in requests]
        return [Replies([None] * (len(keys) * len(fields or [None]))) for fields, keys in requests]


def events(values: list[bytes], decode: Any) -> list[Event]:
    return [Event(Source("in", 0, i, None, v, None, 0), decode(v)) for i, v in enumerate(values)]


@pytest.fixture
def output_schema(tmp_path: Path) -> Path:
    schema = json.loads((SCHEMAS / "prediction.avsc").read_text())
    schema["fields"] += [
        {"name": "when_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "when_ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "cat_ms", "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}]},
        {"name": "local_ms", "type": ["null", {"type": "long", "logicalType": "local-timestamp-millis"}]},
    ]
    path = tmp_path / "out.avsc"
    path.write_text(json.dumps(schema))
    return path


def test_ids_keys_categories_and_copies_are_as_they_were(output_schema: Path, tmp_path: Path) -> None:
    parsed = fastavro.parse_schema(TRIP)
    values = []
    for record in RECORDS:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, record)
        values.append(buffer.getvalue())
    before = events(values, lambda v: fastavro.schemaless_reader(io.BytesIO(v), parsed, None))
    decoder = LocalSchemaDecoder(parsed)
    after = [Event(e.source, fields) for e, fields in zip(before, decoder.decode_many(values), strict=True)]
    assert isinstance(before[0].fields["id"], datetime)
    assert after[0].fields["id"] == RECORDS[0]["id"], "decoded as epoch ms"

    (tmp_path / "trip.avsc").write_text(json.dumps(TRIP))
    settings = InputSettings(topic="in", schema=tmp_path / "trip.avsc", key_field="key", event_id_field="id",
                             event_time_field="when")  # fmt: skip
    outputs = ModelOutputs(score=np.array([0.5, 0.25, 0.75]), label=np.array([1, 0, 1]))
    old = PredictionEncoder(output_schema, settings, COPIES)
    new = PredictionEncoder(output_schema, settings, COPIES, event_schema=TRIP)
    assert [old.key_of(e) for e in before] == [new.key_of(e) for e in after]
    assert new.key_of(after[0]) == "1970-01-02T00:00:00"
    encoded_before, rejected_before = old.encode(before, outputs, "m", "1")
    encoded_after, rejected_after = new.encode(after, outputs, "m", "1")
    assert not rejected_before
    assert not rejected_after
    read = fastavro.parse_schema(json.loads(output_schema.read_text()))
    for b, a in zip(encoded_before, encoded_after, strict=True):
        assert (b.key, b.headers) == (a.key, a.headers)
        pb, pa = decode_prediction(read, b.value), decode_prediction(read, a.value)
        pb.pop("prediction_time"), pa.pop("prediction_time")
        assert pb == pa
    assert decode_prediction(read, encoded_after[0].value)["event_id"] == "2023-11-14T22:13:20.123000+00:00"

    specs = [
        FeatureSpec(name="cat", source="event", field="cat", dtype="string", default="none"),
        FeatureSpec(name="when", source="event", field="when", dtype="float64"),
        FeatureSpec(name="when_i", source="event", field="when", dtype="int64"),
        FeatureSpec(name="simple", source="redis", key="k:{id}", field="x", default=0.0),
        FeatureSpec(name="formatted", source="redis", key="f:{when:%Y}:{key}", field="y", default=0.0),
    ]
    keys_before, keys_after = Keys(), Keys()
    built_before = FeatureBuilder(specs, keys_before).build(before)
    built_after = FeatureBuilder(specs, keys_after, event_schema=TRIP).build(after)
    assert keys_before.asked == keys_after.asked
    assert keys_after.asked[0][0] == "k:2023-11-14T22:13:20.123000+00:00"
    assert [r.message for r in built_before.rejected] == [r.message for r in built_after.rejected]
    for name in built_before.columns:
        np.testing.assert_array_equal(built_before.columns[name], built_after.columns[name])
    assert built_after.columns["when"][0] == 1_700_000_000_000.0


def test_a_timestamp_beyond_year_9999_read_as_text_rejects_the_record() -> None:
    """Decoded as a number it no longer fails at decode; rendered as an id or category it fails there."""
    get = text_getter("id", TRIP)
    assert get({"id": 0}) == datetime(1970, 1, 1, tzinfo=UTC)
    assert get({"id": None}) is None
    with pytest.raises(ValueError, match="outside years 1-9999"):
        get({"id": 2**62})
