"""The packed float32 feature layout (one MGET per key template and batch) and per-key parsing of hashes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streamserve.config import FeatureSpec, PipelineSettings
from streamserve.ops.tools import load_packed_features, pack_vector
from streamserve.pipeline.features import FeatureBuilder, FeatureRequest, Replies
from streamserve.pipeline.features.keys import _column_renderer, _key_renderer
from streamserve.pipeline.features.values import parse_column
from streamserve.records import Event, Source


def event(offset: int, **fields: Any) -> Event:
    return Event(Source("in", 0, offset, None, b"", None, 0), fields)


def vector(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


class Store:
    """Hashes and packed vectors in dicts, answering the builder's batched requests; counts round trips."""

    def __init__(self, hashes: dict[str, dict[str, Any]], strings: dict[str, bytes]) -> None:
        self.hashes = hashes
        self.strings = strings
        self.round_trips: list[Sequence[FeatureRequest]] = []

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        self.round_trips.append(requests)
        return [
            Replies(
                [self.strings.get(key) for key in keys]
                if fields is None
                else [self.hashes.get(key, {}).get(f) for key in keys for f in fields]
            )
            for fields, keys in requests
        ]


CARD = "card:{card_id}"
SPECS = [
    FeatureSpec(name="amount", source="event", field="amount"),
    FeatureSpec(name="avg", source="redis", key=CARD, field="avg", layout="packed", index=0, default=50.0),
    FeatureSpec(name="count", source="redis", key=CARD, field="count", layout="packed", index=2),
    FeatureSpec(name="risk", source="redis", key="merchant:{m}", field="risk", default=0.5),  # a hash
]


def test_packed_vectors_fill_the_matrix_in_spec_order() -> None:
    store = Store(
        {"merchant:x": {"risk": b"0.25"}},
        {"card:a": vector(10.5, 99.0, 3.0), "card:b": vector(math.nan, 1.0, 7.0)},
    )
    builder = FeatureBuilder(SPECS, store)
    batch = builder.build(
        [
            event(0, amount=1.0, card_id="a", m="x"),
            event(1, amount=2.0, card_id="b", m="y"),  # NaN avg -> default; merchant missing -> default
            event(2, amount=3.0, card_id="a", m="x"),
        ]
    )
    np.testing.assert_array_equal(
        batch.matrix,
        np.array([[1.0, 10.5, 3.0, 0.25], [2.0, 50.0, 7.0, 0.5], [3.0, 10.5, 3.0, 0.25]], dtype=np.float32),
    )
    assert batch.missing_defaults == 2
    assert not batch.rejected
    assert len(store.round_trips) == 1, "hashes and vectors in one round trip"
    assert store.round_trips[0][0] == (None, ["card:a", "card:b"]), "one MGET of the distinct keys"


def test_missing_or_short_vector_counts_as_missing() -> None:
    store = Store({"merchant:x": {"risk": b"1"}}, {"card:short": vector(4.0), "card:odd": vector(1.0, 2.0, 3.0) + b"x"})
    batch = FeatureBuilder(SPECS, store).build(
        [
            event(0, amount=1.0, card_id="short", m="x"),  # no element 2: count has no default
            event(1, amount=1.0, card_id="none", m="x"),  # no vector at all
            event(2, amount=1.0, card_id="odd", m="x"),  # trailing byte ignored
        ]
    )
    assert [e.source.offset for e in batch.events] == [2]
    np.testing.assert_array_equal(batch.matrix, np.array([[1.0, 1.0, 3.0, 1.0]], dtype=np.float32))
    reasons = {r.source.offset: r.message for r in batch.rejected}
    assert set(reasons) == {0, 1}
    assert all("'count'" in message for message in reasons.values())


def test_degraded_batch_uses_defaults_without_asking_redis() -> None:
    store = Store({}, {})
    specs = [s for s in SPECS if s.name != "count"]
    batch = FeatureBuilder(specs, store).build([event(0, amount=1.0, card_id="a", m="x")], redis_available=False)
    assert batch.degraded
    assert not store.round_trips
    np.testing.assert_array_equal(batch.matrix, np.array([[1.0, 50.0, 0.5]], dtype=np.float32))


def test_hash_values_are_parsed_per_key_and_bad_ones_reject_their_events() -> None:
    specs = [
        FeatureSpec(name="avg", source="redis", key=CARD, field="avg"),
        FeatureSpec(name="n", source="redis", key=CARD, field="n", dtype="int64", default=0.0),
    ]
    store = Store({"card:a": {"avg": b"1.5", "n": b"3"}, "card:b": {"avg": b"oops", "n": b"4"}}, {})
    batch = FeatureBuilder(specs, store).build(
        [event(0, card_id="a"), event(1, card_id="b"), event(2, card_id="a"), event(3, card_id="b")]
    )
    assert [e.source.offset for e in batch.events] == [0, 2]
    np.testing.assert_array_equal(batch.matrix, np.array([[1.5, 3.0], [1.5, 3.0]], dtype=np.float32))
    assert {r.source.offset for r in batch.rejected} == {1, 3}
    assert all("cannot parse b'oops' as float32" in r.message for r in batch.rejected)


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([1, 2.5, True, None], "float32", [1.0, 2.5, 1.0, math.nan]),
        ([True, False], "bool", [1.0, 0.0]),
        ([3, None], "int64", [3.0, math.nan]),
        (["7", b"8"], "int32", [7.0, 8.0]),
        (["true", "no"], "bool", [1.0, 0.0]),
        ([b" 2.5 ", b"nan", None], "float64", [2.5, math.nan, math.nan]),
    ],
)
def test_event_and_hash_values_parse_as_before(values: list[Any], dtype: str, expected: list[float]) -> None:
    spec = FeatureSpec(name="x", source="event", field="x", dtype=dtype)  # type: ignore[arg-type]
    reasons: dict[int, str] = {}
    parsed = parse_column(spec, values, reasons)
    np.testing.assert_array_equal(parsed, np.array(expected))
    assert not reasons


def test_packed_spec_validation() -> None:
    with pytest.raises(ValidationError, match="needs the vector index"):
        FeatureSpec(name="x", source="redis", key=CARD, field="x", layout="packed")
    with pytest.raises(ValidationError, match="index is for layout 'packed'"):
        FeatureSpec(name="x", source="redis", key=CARD, field="x", index=1)
    with pytest.raises(ValidationError, match="max_age_s needs layout 'hash'"):
        FeatureSpec(
            name="x", source="redis", key=CARD, field="x", layout="packed", index=0, max_age_s=5, updated_at_field="t"
        )
    with pytest.raises(ValidationError, match="is for source 'redis'"):
        FeatureSpec(name="x", source="event", field="x", layout="packed", index=0)


def test_one_key_template_has_one_layout() -> None:
    mixed = [SPECS[1], FeatureSpec(name="other", source="redis", key=CARD, field="other")]
    with pytest.raises(ValidationError, match="mix layouts"):
        PipelineSettings.model_validate(
            {
                "input": {"topic": "t", "schema": "s.avsc", "key_field": "k", "event_id_field": "e"},
                "features": [spec.model_dump() for spec in mixed],
                "model": {"name": "m", "uri": "m.onnx"},
                "output": {"topic": "o", "schema": "p.avsc", "dead_letter_topic": "d"},
            }
        )
    with pytest.raises(ValueError, match="mix layouts"):
        FeatureBuilder(mixed, Store({}, {}))


class FakePipeline:
    def __init__(self, sink: dict[str, bytes]) -> None:
        self.sink = sink
        self.pending: list[tuple[str, bytes]] = []

    def set(self, key: str, value: bytes) -> None:
        self.pending.append((key, value))

    def execute(self) -> None:
        self.sink.update(self.pending)
        self.pending.clear()


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self.data)


def test_load_packed_features_writes_vectors_in_field_order() -> None:
    client = FakeRedis()
    rows = [{"card_id": "a", "avg": "10.5", "count": "3", "extra": "x"}, {"card_id": "b", "avg": "", "count": "7"}]
    written = load_packed_features(client, rows, "card:{card_id}", ["avg", "unused", "count"])  # type: ignore[arg-type]
    assert written == 2
    np.testing.assert_array_equal(np.frombuffer(client.data["card:a"], "<f4"), [10.5, math.nan, 3.0])
    np.testing.assert_array_equal(np.frombuffer(client.data["card:b"], "<f4"), [math.nan, math.nan, 7.0])
    assert pack_vector({"v": 1}, ["v"]) == vector(1.0)


@pytest.mark.parametrize(
    "template", ["card:{card_id}", "{card_id}", "x:{card_id}:y", "a:{card_id}:{n}", "p:{n:>4}", "p:{card_id!r}", "k"]
)
def test_key_rendering_matches_format_map(template: str) -> None:
    fields = {"card_id": "c-1", "n": 7}
    assert _key_renderer(template)(fields) == template.format_map(fields)
    with pytest.raises(KeyError, match="missing"):
        _key_renderer(template + "{missing}")(fields)


KEY_VALUES = st.none() | st.text(max_size=6) | st.integers(-(10**20), 10**20) | st.booleans()


@settings(max_examples=200, deadline=None)
@given(
    template=st.sampled_from(["card:{card_id}", "{card_id}", "x:{card_id}:y", "a:{card_id}:{n}", "p:{n:>4}", "k"]),
    rows=st.lists(st.dictionaries(st.sampled_from(["card_id", "n"]), KEY_VALUES), max_size=6),
)
def test_a_batch_renders_as_its_events_do(template: str, rows: list[dict[str, object]]) -> None:
    """The batch renderer gives each event's key as the per-event renderer does, or fails where it fails."""
    render = _key_renderer(template)
    expected: list[str] = []
    failed = False
    for fields in rows:
        try:
            expected.append(render(fields))
        except (KeyError, ValueError, IndexError, TypeError):
            failed = True
            break
    if failed:
        with pytest.raises((KeyError, ValueError, IndexError, TypeError)):
            _column_renderer(template)(rows)
    else:
        assert _column_renderer(template)(rows) == expected
