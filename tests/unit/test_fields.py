"""Event fields as users write them: paths, nullable unions, enums, logical types, arrays, categories."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamserve.config import FeatureSpec, PipelineSettings
from streamserve.errors import ConfigError
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.fields import check_event_schema, epoch_ms, getter, parse_path, resolve
from streamserve.records import Event, Source

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Order",
    "namespace": "shop",
    "fields": [
        {"name": "id", "type": ["null", "long"]},
        {"name": "customer", "type": ["null", {"type": "record", "name": "Customer", "fields": [
            {"name": "id", "type": "string"},
            {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["BASIC", "GOLD"]}},
            {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
                {"name": "zip", "type": ["null", "string"]}]}},
        ]}]},
        {"name": "previous", "type": ["null", "Customer"]},
        {"name": "scores", "type": {"type": "array", "items": "double"}},
        {"name": "tags", "type": {"type": "map", "values": "string"}},
        {"name": "either", "type": ["null", "string", "long"]},
        {"name": "when", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}},
    ],
}  # fmt: skip


def test_paths_parse_and_read_through_nulls() -> None:
    assert parse_path("customer.address.zip") == ("customer", "address", "zip")
    assert parse_path("scores[2]") == ("scores", 2)
    event = {"customer": {"address": {"zip": "75001"}}, "scores": [1.0, 2.0], "previous": None}
    assert getter("customer.address.zip")(event) == "75001"
    assert getter("scores[1]")(event) == 2.0
    assert getter("scores[5]")(event) is None
    assert getter("previous.address.zip")(event) is None
    with pytest.raises(ConfigError, match="invalid field path"):
        parse_path("customer..zip")


def test_resolve_kinds_nullability_and_named_types() -> None:
    assert resolve(SCHEMA, "customer.tier").kind == "enum"
    assert resolve(SCHEMA, "customer.tier").nullable  # the customer record is nullable
    assert resolve(SCHEMA, "previous.tier").symbols == ("BASIC", "GOLD")  # a named type used again
    assert resolve(SCHEMA, "customer.address.zip").kind == "string"
    assert resolve(SCHEMA, "scores").items is not None
    assert resolve(SCHEMA, "scores[3]").kind == "float"
    assert resolve(SCHEMA, "when").kind == "timestamp"
    assert resolve(SCHEMA, "day").kind == "date"
    assert resolve(SCHEMA, "total").kind == "decimal"
    assert not resolve(SCHEMA, "day").nullable


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("customer.nope", "has no field 'nope'"),
        ("either", "union of"),
        ("scores.x", "is not a record"),
        ("id[0]", "is not an array"),
    ],
)
def test_unsupported_paths_name_the_field(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(SCHEMA, path)


def settings(tmp_path: Path, features: list[dict[str, Any]], **input_fields: Any) -> PipelineSettings:
    schema = tmp_path / "order.avsc"
    schema.write_text(json.dumps(SCHEMA))
    return PipelineSettings.model_validate(
        {
            "input": {"topic": "t", "schema": str(schema), "key_field": "customer.id", "event_id_field": "id"}
            | input_fields,
            "features": features,
            "model": {"name": "m", "uri": "m.onnx"},
            "output": {"topic": "o", "schema": "p.avsc", "dead_letter_topic": "d"},
        }
    )


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        ({"name": "t", "source": "event", "field": "customer.tier"}, "is an enum"),
        ({"name": "s", "source": "event", "field": "scores"}, "give `length`"),
        ({"name": "s", "source": "event", "field": "customer.id", "length": 2}, "vector feature"),
        ({"name": "m", "source": "event", "field": "tags", "dtype": "string"}, "map"),
        ({"name": "c", "source": "event", "field": "customer", "dtype": "string"}, "record"),
        ({"name": "r", "source": "redis", "field": "x", "key": "c:{tags}"}, "key field 'tags'"),
    ],
)
def test_check_event_schema_refuses_what_it_cannot_read(tmp_path: Path, feature: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_event_schema(SCHEMA, settings(tmp_path, [feature]))


def test_check_event_schema_accepts_the_supported_subset(tmp_path: Path) -> None:
    features = [
        {"name": "tier", "source": "event", "field": "customer.tier", "dtype": "string"},
        {"name": "zip", "source": "event", "field": "customer.address.zip", "dtype": "string", "default": "-"},
        {"name": "s2", "source": "event", "field": "scores[2]", "default": 0.0},
        {"name": "s", "source": "event", "field": "scores", "length": 3},
        {"name": "when", "source": "event", "field": "when", "dtype": "float64"},
        {"name": "total", "source": "event", "field": "total"},
        {"name": "r", "source": "redis", "field": "x", "key": "cust:{customer.id}", "default": 1.0},
    ]
    check_event_schema(SCHEMA, settings(tmp_path, features, event_time_field="when"))
    with pytest.raises(ConfigError, match="event_time_field"):
        check_event_schema(SCHEMA, settings(tmp_path, features, event_time_field="customer.id"))


def event(offset: int, **fields: Any) -> Event:
    return Event(Source("in", 0, offset, None, b"", None, 0), fields)


def test_categories_vectors_logical_types_and_the_null_rule() -> None:
    specs = [
        FeatureSpec(name="tier", source="event", field="customer.tier", dtype="string", default="BASIC"),
        FeatureSpec(
            name="tier_1h", source="event", field="customer.tier", dtype="string", encoding="onehot",
            vocabulary=["BASIC", "GOLD"], default="BASIC",
        ),
        FeatureSpec(
            name="tier_ord", source="event", field="customer.tier", dtype="string", encoding="ordinal",
            vocabulary=["BASIC", "GOLD"], default="GOLD",
        ),
        FeatureSpec(name="s", source="event", field="scores", length=2),
        FeatureSpec(name="day", source="event", field="day"),
        FeatureSpec(name="total", source="event", field="total", dtype="float64"),
        FeatureSpec(name="when", source="event", field="when", dtype="float64", default=-1.0),
    ]  # fmt: skip
    when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    base = {"scores": [1.5, 2.5], "day": date(1970, 1, 11), "total": Decimal("12.34"), "when": when}
    events = [
        event(0, customer={"tier": "GOLD"}, **base),
        event(1, customer=None, **base),  # null record on the path: defaults
        event(2, customer={"tier": "PLATINUM"}, **base),  # unknown category: unknown bucket
        event(3, customer={"tier": "GOLD"}, **{**base, "scores": [1.0]}),  # wrong length
        event(4, customer={"tier": "GOLD"}, **{**base, "scores": [1.0, math.nan]}),  # NaN in the array
        event(5, customer={"tier": "GOLD"}, **{**base, "when": None}),
    ]
    batch = FeatureBuilder(specs, None).build(events)
    assert [e.source.offset for e in batch.events] == [0, 1, 2, 5]
    reasons = {r.source.offset: r.message for r in batch.rejected}
    assert "expected 2 values, got 1" in reasons[3]
    assert "NaN or infinity" in reasons[4]
    assert batch.columns["tier"].tolist() == ["GOLD", "BASIC", "PLATINUM", "GOLD"]
    np.testing.assert_array_equal(batch.columns["tier_1h"], [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(batch.columns["tier_ord"], [1, 1, 2, 1])
    np.testing.assert_array_equal(batch.columns["s"], [[1.5, 2.5]] * 4)
    np.testing.assert_array_equal(batch.columns["day"], [10.0] * 4)
    np.testing.assert_array_equal(batch.columns["total"], [12.34] * 4)
    assert batch.columns["when"].tolist() == [float(epoch_ms(when))] * 3 + [-1.0]


@pytest.mark.parametrize(
    ("dtype", "value", "reason"),
    [
        ("float32", math.nan, "not a finite number"),
        ("float32", math.inf, "not a finite number"),
        ("float64", -math.inf, "not a finite number"),
        ("float32", 1e300, "out of float32 range"),
        ("int32", 2**40, "not an int32 integer"),
        ("int64", 2.5, "not an int64 integer"),
        ("float32", "abc", "cannot parse 'abc'"),
    ],
)
def test_bad_event_values_are_dead_lettered_even_with_a_default(dtype: str, value: Any, reason: str) -> None:
    spec = FeatureSpec(name="x", source="event", field="x", dtype=dtype, default=0.0)  # type: ignore[arg-type]
    batch = FeatureBuilder([spec], None).build([event(0, x=value), event(1, x=None), event(2, x=3)])
    assert [e.source.offset for e in batch.events] == [1, 2]
    assert batch.columns["x"].tolist() == [0.0, 3.0]
    assert reason in batch.rejected[0].message
    assert "'x'" in batch.rejected[0].message
