"""Streaming features without servers: windows, aggregates in any arrival order, extraction, config checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.config import AggregateSpec, PipelineSettings, StreamFeatureSettings, config_from
from streamserve.errors import ConfigError
from streamserve.records import Event, Source
from streamserve.streaming.extract import Extractor, check_field, entity_groups
from streamserve.streaming.windows import FUNCTIONS, Aggregate, EntityState, Window
from tests.integration.harness import EXAMPLE_PIPELINE


def test_the_current_window_is_the_one_holding_the_time_that_started_first() -> None:
    tumbling, hopping = Window(10, 10), Window(60, 10)
    assert [tumbling.current(t) for t in (0, 9, 10, -1)] == [0, 0, 10, -10]
    assert hopping.current(65) == 10  # [10, 70) holds 65; [0, 60) does not
    assert hopping.current(70) == 20  # 70 is past [10, 70)
    assert list(hopping.starts(65)) == [10, 20, 30, 40, 50, 60]
    for t in range(-200, 200):
        assert all(start <= t < start + 60 for start in hopping.starts(t))
        assert len(hopping.starts(t)) == 6


def brute_force(function: str, window: Window, events: list[tuple[int, Any]]) -> float | None:
    """The aggregate over the current window of the latest time, by definition, with the standard library."""
    latest = max(t for t, _ in events)
    start = next(s for s in range(latest - window.size_ms + 1, latest + 1) if s % window.hop_ms == 0)
    inside = [value for t, value in events if start <= t < start + window.size_ms]
    if function == "count":
        return float(len(inside))
    if function == "distinct_count":
        return float(len(set(inside)))
    if not inside:
        return 0.0 if function == "sum" else None
    if function == "sum":
        return math.fsum(inside)
    if function == "mean":
        return math.fsum(inside) / len(inside)
    return float(min(inside) if function == "min" else max(inside))


windows = st.sampled_from([Window(10, 10), Window(30, 10), Window(20, 5), Window(7, 1), Window(1000, 1000)])
values = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False) | st.integers(-5, 5).map(float)
streams = st.lists(st.tuples(st.integers(-100, 200), values), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(function=st.sampled_from(FUNCTIONS), window=windows, events=streams, data=st.data())
def test_any_arrival_order_gives_the_reference(
    function: str, window: Window, events: list[tuple[int, float]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(events))))
    redelivered = data.draw(st.lists(st.integers(0, len(events) - 1), max_size=10))
    aggregates = {"a": Aggregate("a", function, window)}  # type: ignore[arg-type]
    state = EntityState()
    for step, i in enumerate(order):
        time_ms, value = events[i]
        fed = str(value) if function == "distinct_count" else value
        assert state.apply(aggregates, 0, step, time_ms, {"a": fed})
        state = EntityState.from_json(state.to_json())  # through the changelog's JSON every time
    for step in redelivered:  # a redelivery after a crash is recognised, never counted twice
        time_ms, value = events[order[step]]
        assert not state.apply(
            aggregates, 0, step, time_ms, {"a": str(value) if function == "distinct_count" else value}
        )
    reference_events = [(t, str(v) if function == "distinct_count" else v) for t, v in events]
    assert state.current(aggregates)["a"] == brute_force(function, window, reference_events)
    assert state.latest_ms == max(t for t, _ in events)
    assert state.applied == len(events)


def test_old_windows_are_dropped_and_late_events_counted() -> None:
    aggregates = {"n": Aggregate("n", "count", Window(10, 10))}
    state = EntityState()
    state.apply(aggregates, 0, 0, 5, {"n": None})
    state.apply(aggregates, 0, 1, 25, {"n": None})
    assert list(state.windows["n"]) == [20]
    state.apply(aggregates, 0, 2, 3, {"n": None})  # before the current window: it changes nothing shown
    assert state.late == 1
    assert state.current(aggregates) == {"n": 1.0}


def test_sums_are_exact_whatever_the_order() -> None:
    aggregates = {"s": Aggregate("s", "sum", Window(100, 100))}
    forward, backward = EntityState(), EntityState()
    numbers = [1e16, 1.0, -1e16, 1.0]
    for i, x in enumerate(numbers):
        forward.apply(aggregates, 0, i, 1, {"s": x})
    for i, x in enumerate(reversed(numbers)):
        backward.apply(aggregates, 0, i, 1, {"s": x})
    assert forward.current(aggregates) == backward.current(aggregates) == {"s": 2.0}


# --- extraction: reasons, never exceptions ----------------------------------------------------------------------

SCHEMA = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "who", "type": ["null", "string"]},
        {"name": "x", "type": ["null", "double"]},
        {"name": "tag", "type": {"type": "enum", "name": "T", "symbols": ["A", "B"]}},
        {"name": "t", "type": ["null", "long"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}


def pipeline(aggregates: list[dict[str, Any]], key_field: str = "who") -> PipelineSettings:
    config = config_from(
        EXAMPLE_PIPELINE,
        {
            "input": {"key_field": key_field, "event_id_field": "id", "event_time_field": "t"},
            "stream_features": {"aggregates": aggregates},
        },
    )
    return PipelineSettings(**config)


def event(offset: int, **fields: Any) -> Event:
    base = {"id": f"e{offset}", "who": "w", "x": 1.0, "tag": "A", "t": 1000, "tags": []}
    return Event(Source("in", 0, offset, None, b"", None, 0), {**base, **fields})


def test_extraction_names_every_reason_and_feeds_what_it_can() -> None:
    settings = pipeline(
        [
            {"name": "n", "key": "k:{who}", "function": "count", "window_s": 1},
            {"name": "s", "key": "k:{who}", "function": "sum", "field": "x", "window_s": 1},
            {"name": "d", "key": "k:{who}", "function": "distinct_count", "field": "tag", "window_s": 1},
        ]
    )
    extract = Extractor(entity_groups(settings, SCHEMA), "t")
    out = extract([event(0), event(1, x=None), event(2, who=None), event(3, t=None), event(4, x=math.inf)])
    assert [(c.offset, sorted(c.values)) for c in out.contributions] == [
        (0, ["d", "n", "s"]),
        (1, ["d", "n"]),
        (4, ["d", "n"]),
    ]
    why = {e.source.offset: " ".join(r) for e, r in out.rejected}
    assert set(why) == {1, 2, 3, 4}
    assert "field 'x' is null or missing" in why[1]
    assert "entity key 'k:{who}'" in why[2]
    assert "event time 't' is null" in why[3]
    assert "not a finite number" in why[4]
    assert out.reasons == {"missing_field": 1, "no_entity_key": 1, "no_event_time": 1, "bad_value": 1}


def test_a_text_that_is_no_number_is_a_reason() -> None:
    schema = {**SCHEMA, "fields": [*SCHEMA["fields"][:2], {"name": "x", "type": "string"}, *SCHEMA["fields"][3:]]}
    settings = pipeline([{"name": "m", "key": "k:{who}", "function": "max", "field": "x", "window_s": 1}])
    out = Extractor(entity_groups(settings, schema), "t")([event(0, x="12.5"), event(1, x="twelve")])
    assert [c.values for c in out.contributions] == [{"m": 12.5}]
    assert "twelve" in " ".join(out.rejected[0][1])


# --- config: a window, a known field, an entity key template -----------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"function": "sum", "window_s": 1}, "needs a field"),
        ({"function": "count", "field": "x", "window_s": 1}, "takes no field"),
        ({"function": "count", "window_s": 0}, "greater than 0"),
        ({"function": "count", "window_s": 0.0005}, "whole number of milliseconds"),
        ({"function": "count", "window_s": 10, "hop_s": 3}, "divide window_s"),
        ({"function": "count", "window_s": 10, "hop_s": 20}, "divide window_s"),
        ({"function": "count", "window_s": 10, "layout": "packed"}, "go together"),
        ({"function": "median", "window_s": 10}, "count"),
    ],
)
def test_bad_aggregates_are_refused(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AggregateSpec(name="a", key="k:{who}", **spec)


def test_the_key_template_must_be_the_input_key() -> None:
    settings = pipeline([{"name": "n", "key": "k:{tag}", "function": "count", "window_s": 1}])
    with pytest.raises(ConfigError, match=r"must be filled from input\.key_field 'who' alone"):
        entity_groups(settings, SCHEMA)
    with pytest.raises(ValueError, match="appears twice"):
        StreamFeatureSettings(aggregates=[{"name": "n", "key": "k", "function": "count", "window_s": 1}] * 2)


@pytest.mark.parametrize(
    ("field", "function", "message"),
    [
        ("nope", "sum", "has no field 'nope'"),
        ("tags", "distinct_count", "is an Avro array"),
        ("tag", "mean", "mean needs a number"),
    ],
)
def test_fields_are_checked_against_the_event_schema(field: str, function: str, message: str) -> None:
    spec = AggregateSpec(name="a", key="k:{who}", function=function, field=field, window_s=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        check_field(spec, SCHEMA)


def test_the_demo_trains_on_the_count_its_pipeline_streams() -> None:
    """The fraud demo's training count (demo/data.py, computed on its own) is the app's aggregate, event by event."""
    from streamserve.demo.data import STREAMED_COUNT_HOP_MS, STREAMED_COUNT_WINDOW_MS, streamed_counts

    settings = PipelineSettings(**config_from(EXAMPLE_PIPELINE))
    [spec] = settings.stream_features.aggregates
    assert (spec.function, spec.window_ms, spec.hop_ms) == ("count", STREAMED_COUNT_WINDOW_MS, STREAMED_COUNT_HOP_MS)
    [feature] = [f for f in settings.features if f.name == spec.name]
    assert (feature.key, feature.field) == (spec.key, spec.name)

    aggregates = {spec.name: Aggregate(spec.name, "count", Window(spec.window_ms, spec.hop_ms))}
    start = 1_700_000_000_000
    events = [{"card_id": f"c{i % 7}", "event_time": start + i * 997_000} for i in range(400)]  # ~4.6 days
    states: dict[str, EntityState] = {}
    for offset, (event, count) in enumerate(zip(events, streamed_counts(events), strict=True)):
        state = states.setdefault(event["card_id"], EntityState())
        state.apply(aggregates, 0, offset, event["event_time"], {spec.name: None})
        assert state.current(aggregates)[spec.name] == count


def test_an_app_without_aggregates_is_refused_in_one_line() -> None:
    from streamserve.streaming.app import build_app

    with pytest.raises(ConfigError, match=r"stream_features\.aggregates is empty"):
        build_app(pipeline([]), partitions=1)
