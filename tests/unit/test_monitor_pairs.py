"""The join state: either side first, replays applied once, duplicates and late labels rejected, expiry; the
labels topic's decoding; a window's report from entries."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from streamserve.monitor import labels, pairs
from streamserve.monitor.exporter import QualityExporter
from streamserve.monitor.pairs import Index, Timing
from streamserve.monitor.report import ReportSettings, decode, encode, format_report, latest, window_reports

T = Timing(window_ms=3_600_000, ttl_ms=7_200_000, sweep_ms=60_000)
T0 = 1_767_225_600_000


def _prediction(event_id: str, score: float, origin: str = "out/0/1", role: str = "main") -> dict[str, Any]:
    record = {
        "model_name": "fraud",
        "model_version": "v1" if role == "main" else "v2",
        "score": score,
        "predicted_class": str(int(score >= 0.5)),
        "probabilities": {"0": 1 - score, "1": score},
        "label": None,
    }
    return pairs.prediction_message(origin, role, record, T0 + 1000)


def _label(value: str, origin: str = "labels/0/1", at: int = T0 + 60_000) -> dict[str, Any]:
    return pairs.label_message(origin, value, at, labels.encode("e1", value, at))


def _run(messages: list[dict[str, Any]], start: int = 0) -> tuple[dict[str, Any] | None, list[str]]:
    entry: dict[str, Any] | None = None
    kinds: list[str] = []
    for offset, message in enumerate(messages, start):
        new, effects = pairs.apply(entry, message, 0, offset, 0, T, set())
        entry = new if new is not None else entry
        kinds += [e.kind for e in effects]
    return entry, kinds


@pytest.mark.parametrize("label_first", [False, True])
def test_either_side_may_come_first(label_first: bool) -> None:
    messages = [_label("1"), _prediction("e1", 0.8)]
    entry, kinds = _run(messages if label_first else messages[::-1])
    assert entry is not None
    assert entry["y"] == "1"
    assert len(entry["s"]) == 1
    assert kinds == ["joined"]


def test_a_replayed_record_is_applied_once_and_a_reforwarded_one_lands_in_place() -> None:
    entry, _ = _run([_prediction("e1", 0.8), _label("1")])
    assert entry is not None
    new, effects = pairs.apply(entry, _label("1"), 0, 1, 0, T, set())  # same offset: replay after a crash
    assert (new, effects) == (None, [])
    new, effects = pairs.apply(entry, _label("1"), 0, 7, 0, T, set())  # same origin, new offset: re-forwarded
    assert new is not None
    assert effects == []
    new, effects = pairs.apply(entry, _prediction("e1", 0.8), 0, 8, 0, T, set())  # worker re-sent it
    assert new is not None
    assert effects == []


def test_duplicate_wrong_class_and_late_labels_are_rejected() -> None:
    entry, kinds = _run([_prediction("e1", 0.8), _label("1"), _label("0", origin="labels/0/9")])
    assert kinds == ["joined", "duplicate"]
    assert entry is not None
    assert entry["y"] == "1"
    entry, kinds = _run([_label("banana"), _prediction("e1", 0.8)])
    assert kinds == ["wrong_type"]
    assert entry is not None
    assert entry["y"] is None
    expired, effects = pairs.expire(entry)
    assert expired is not None
    assert [e.kind for e in effects] == ["never_labelled"]
    _new, effects = pairs.apply(expired, _label("1", origin="labels/0/5"), 0, 99, 0, T, set())
    assert [e.kind for e in effects] == ["expired"]


def test_label_without_prediction_expires_as_unknown_event() -> None:
    entry, _ = _run([_label("1")])
    assert entry is not None
    gone, effects = pairs.expire(entry)
    assert gone is None
    assert [e.kind for e in effects] == ["unknown_event"]
    assert effects[0].raw == labels.encode("e1", "1", T0 + 60_000)


def test_prediction_for_a_final_window_or_past_the_ttl_is_late() -> None:
    _, effects = pairs.apply(None, _prediction("e1", 0.8), 0, 0, 0, T, {T.window(T0)})
    assert [e.kind for e in effects] == ["late_prediction"]
    _, effects = pairs.apply(None, _prediction("e1", 0.8), 0, 0, T0 + 10 * 3_600_000, T, set())
    assert [e.kind for e in effects] == ["late_prediction"]


def test_index_schedules_expiry_and_rebuilds_from_the_table() -> None:
    index = Index(T)
    entry, _ = _run([_prediction("e1", 0.8)])
    assert entry is not None
    index.add("e:e1", entry)
    index.add("e:e1", entry)  # scheduled once
    assert index.due(0, T0 + 1000 + T.ttl_ms) == []
    assert index.due(0, T0 + 1001 + T.ttl_ms) == ["e:e1"]
    past = T0 + T.window_ms + T.ttl_ms  # partition 0 swept past the window's end plus the TTL: final there
    table = {"e:e1": entry, pairs.sweep_key(0): {"swept": past, "through": 3, "clocks": {"out/0": 9}}}
    table[pairs.final_key(T0, 1)] = {"entries": 4}
    index.rebuild(table.items())
    assert index.swept == {0: past}
    assert index.through == {0: 3}
    assert T0 in index.finals
    assert index.purgeable(0) == [T0]
    assert index.purgeable(1) == []  # purged there already (its marker)
    assert index.final_in(1) == {T0}
    assert index.final_in(0) == set()
    index.swept[0] = past - 1
    assert index.purgeable(0) == []
    assert index.keys_of(T0, 0) == ["e:e1"]


def test_labels_decoding_rejects_garbage_and_wrong_types() -> None:
    good = labels.parse(labels.encode("e1", 1, T0), "classification")
    assert (good.event_id, good.value, good.time_ms) == ("e1", "1", T0)
    assert labels.parse(labels.encode("e1", 3, T0), "regression").value == 3.0
    for data, task in (
        (b"", "classification"),
        (b"\xff\xff\xff\xff\xff", "classification"),
        (labels.encode("e1", "1", T0)[:-2], "classification"),
        (labels.encode("e1", "1", T0) + b"\x00", "classification"),
    ):
        with pytest.raises(labels.BadLabel) as caught:
            labels.parse(data, task)  # type: ignore[arg-type]
        assert caught.value.reason == labels.UNDECODABLE
    wrong = ((None, "classification"), (0.5, "classification"), ("high", "regression"), (float("nan"), "regression"))
    for value, task in wrong:
        with pytest.raises(labels.BadLabel) as caught:
            labels.parse(labels.encode("e1", value, T0), task)  # type: ignore[arg-type]
        assert caught.value.reason == labels.WRONG_TYPE


def test_window_report_round_trips_through_avro_and_prints() -> None:
    entries = []
    for i in range(30):
        score = (i % 10) / 10 + 0.05
        entry, _ = _run([_prediction(f"e{i}", score), _prediction(f"e{i}", 1 - score, "sh/0/1", "shadow")])
        assert entry is not None
        if i % 3:
            entry = {**entry, "y": str(i % 2), "lt": T0 + 4_000_000, "lo": f"l/0/{i}"}
        entries.append((f"e:e{i}", entry))
    settings = ReportSettings(task="classification", positive_class="1", min_labels=10, bootstrap_samples=100)
    (report,) = window_reports(T.window(T0), T.window_ms, entries, settings, final=False, now_ms=T0)
    assert [(v["version"], v["role"], v["labelled"], v["late"]) for v in report["versions"]] == [
        ("v1", "live", 20, 20),
        ("v2", "shadow", 20, 20),
    ]
    assert report["comparisons"][0]["kind"] == "paired"
    same = json.dumps(report, sort_keys=True)
    assert json.dumps(decode(encode(report)), sort_keys=True) == same
    assert [json.dumps(r, sort_keys=True) for r in latest([(None, encode(report)), (None, b"garbage")])] == [same]
    text = "\n".join(format_report(report))
    assert "v2 (shadow) vs v1 (live), paired, roc_auc" in text

    # A process that stops reporting (by-event partition 0 moved) drops its quality series, keeps the floors.
    registry = CollectorRegistry()
    exporter = QualityExporter(registry)
    exporter.thresholds("fraud", {"roc_auc": 0.8}, {})
    exporter.update(report)
    shown = generate_latest(registry).decode()
    assert 'streamserve_quality_pairs{model="fraud",role="live",state="labelled",version="v1"} 20.0' in shown
    exporter.forget()
    shown = generate_latest(registry).decode()
    assert "streamserve_quality_pairs{" not in shown
    assert "streamserve_quality_comparison_verdict{" not in shown
    assert 'streamserve_quality_floor{metric="roc_auc",model="fraud"} 0.8' in shown


_MESSAGES = [
    _prediction("e1", 0.8),
    _prediction("e1", 0.3, "sh/1/4", "shadow"),
    _label("1", "labels/0/1"),
    _label("0", "labels/0/2"),
]


@settings(max_examples=300, deadline=None)
@given(
    order=st.lists(st.integers(0, len(_MESSAGES) - 1), min_size=1, max_size=10),
    again=st.lists(st.tuples(st.integers(0, 9), st.booleans()), max_size=8),
)
def test_replays_and_reforwards_never_count_a_pair_twice(order: list[int], again: list[tuple[int, bool]]) -> None:
    """Whatever the order, a record replayed (same offset) or forwarded again (new offset) changes nothing: the
    first label of the event counts, each (role, model, version) joins once."""

    def run(records: list[tuple[dict[str, Any], int]]) -> tuple[Any, list[str]]:
        entry: dict[str, Any] | None = None
        joined: list[str] = []
        for message, offset in records:
            new, effects = pairs.apply(entry, message, 0, offset, 0, T, set())
            entry = new if new is not None else entry
            joined += [e.slot or "" for e in effects if e.kind == "joined"]
        assert entry is not None
        return (entry["y"], entry["lo"], sorted(entry["s"])), joined

    once = [(_MESSAGES[i], offset) for offset, i in enumerate(order)]
    with_repeats = list(once)
    next_offset = len(once)
    for position, reforward in again:
        message, offset = once[position % len(once)]
        if reforward:
            with_repeats.append((message, next_offset))  # a forwarder restarted before its commit
            next_offset += 1
        else:
            with_repeats.insert(with_repeats.index((message, offset)) + 1, (message, offset))  # a join replay
    state, joined = run(once)
    assert run(with_repeats)[0] == state
    assert len(joined) == len(set(joined)), "a pair counted twice"
    labels_sent = [_MESSAGES[i]["o"] for i in order if _MESSAGES[i]["k"] == "l"]
    assert state[1] == (labels_sent[0] if labels_sent else None), "the first label counts"
    again_joined = run(with_repeats)[1]
    assert len(again_joined) == len(set(again_joined))


def test_a_rebuilt_join_waits_for_every_input_partition_even_one_never_seen() -> None:
    """After a restart or a rebalance the input partitions another process forwarded resume here: until each
    sends (or stays quiet for idle_s) the partition's clock does not move, so no entry expires early."""
    index = Index(T)
    index.rebuild([], owned=[1], sources=["out/0", "out/1", "labels/0"])
    late = T0 + 4 * 3_600_000
    index.tick(1, 5, {**_prediction("e1", 0.8, "out/0/7"), "t": late})
    assert index.boundary(1, idle_s=60) == 0  # out/1 and labels/0 not heard from yet
    assert index.boundary(1, idle_s=0) == T.boundary(late)  # ... until they count as quiet
    assert index.sweep_marker(1)["clocks"] == {"out/0": late}  # the unseen are not persisted
