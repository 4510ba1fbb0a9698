"""The reporter's view of the split join (monitor/reporter.py): built from changelog records in each partition's
order, whatever the interleaving of partitions; a window is final only when every partition swept past it and
marked it; purged entries stay until the final report; a record written twice counts once."""

from __future__ import annotations

from typing import Any

import faust.utils.json as faust_json
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.monitor import pairs
from streamserve.monitor.reporter import View

T0 = 1_767_225_600_000
HOUR = 3_600_000
T = pairs.Timing(window_ms=HOUR, ttl_ms=2 * HOUR, sweep_ms=60_000)
PAST = T0 + T.window_ms + T.ttl_ms  # a clock swept this far makes the window of T0 final


def _entry(partition: int, time_ms: int, label: str | None = "1", expired: bool = False) -> dict[str, Any]:
    prediction = {"r": "main", "m": "fraud", "v": "v1", "s": 0.7, "c": "1", "pr": None}
    return {"p": partition, "o": 1, "t": time_ms, "s": {"main|fraud|v1": prediction}, "y": label, "x": expired}


def _partition_log(partition: int, events: int, final: bool) -> list[tuple[str, Any]]:
    """What one partition's join writes: entries, their expiry, then (final) the marker and the purge."""
    keys = [pairs.entry_key(f"p{partition}-e{i}") for i in range(events)]
    log: list[tuple[str, Any]] = [(key, _entry(partition, T0 + i * 1000, None)) for i, key in enumerate(keys)]
    log += [(key, _entry(partition, T0 + i * 1000, "1")) for i, key in enumerate(keys)]  # labelled later
    log.append((pairs.sweep_key(partition), {"swept": T0 + 10 * 60_000, "through": 5, "clocks": {}}))
    if final:
        log += [(key, _entry(partition, T0 + i * 1000, "1", expired=True)) for i, key in enumerate(keys)]
        log.append((pairs.sweep_key(partition), {"swept": PAST, "through": 9, "clocks": {}}))
        if keys:
            log.append((pairs.final_key(T0, partition), {"entries": len(keys)}))
        log += [(key, None) for key in keys]
    return log


def _read(view: View, key: str, value: Any) -> None:
    """A record as the changelog holds it (faust's JSON), read as the reader reads it."""
    view.read(faust_json.dumps(key), None if value is None else faust_json.dumps(value))


def _view(records: list[tuple[str, Any]]) -> View:
    view = View(T, 4)
    for key, value in records:
        _read(view, key, value)
    return view


def test_a_window_is_final_only_when_every_partition_swept_past_and_marked_it() -> None:
    done, behind = _partition_log(0, 3, final=True), _partition_log(1, 2, final=False)
    view = _view(done + behind + _partition_log(2, 0, final=True) + _partition_log(3, 0, final=True))
    (due,) = view.due()
    assert (due.window, due.final, len(due.entries)) == (T0, False, 5)  # the purge of partition 0 kept its entries
    assert {key for key, _ in due.entries} >= {pairs.entry_key("p0-e0"), pairs.entry_key("p1-e1")}
    for key, value in _partition_log(1, 2, final=True)[len(behind) :]:
        _read(view, key, value)
    (due,) = view.due()
    assert (due.final, len(due.entries)) == (True, 5)
    assert all(entry["x"] for _, entry in due.entries)
    assert view.entries == {}
    assert view.windows == {}
    _read(view, pairs.entry_key("p1-e0"), _entry(1, T0, "1", expired=True))  # a replayed record afterwards
    assert view.due() == []
    assert view.entries == {}


def test_finals_wait_for_every_partition_of_the_join() -> None:
    view = _view([r for p in range(3) for r in _partition_log(p, 2, final=True)])
    assert [d.final for d in view.due()] == [False]  # partition 3 sent nothing yet: it may hold entries of it
    _read(view, pairs.sweep_key(3), {"swept": PAST, "through": 0, "clocks": {}})
    view.dirty.add(T0)
    assert [(d.final, len(d.entries)) for d in view.due()] == [(True, 6)]


def test_a_record_written_twice_is_one_pair() -> None:
    log = _partition_log(0, 4, final=False)
    view = _view(log + log[2:6])  # a join replayed after a SIGKILL writes some records again
    (due,) = view.due()
    assert len(due.entries) == 4


def test_a_final_window_whose_entries_were_compacted_away_is_not_reported_from_part_of_them() -> None:
    log = _partition_log(0, 4, final=True)
    compacted = [log[1]] + [(k, v) for k, v in log if not k.startswith(pairs.ENTRY)]  # one entry of 4 left
    others = [r for p in (1, 2, 3) for r in _partition_log(p, 0, final=True)]
    view = _view(compacted + others)
    assert view.due() == []
    assert T0 in view.reported


def test_a_deleted_label_only_entry_leaves_no_trace() -> None:
    key = pairs.entry_key("ghost")
    view = _view([(key, {"p": 2, "o": 1, "t": None, "s": {}, "y": "1", "lt": T0, "x": False}), (key, None)])
    assert view.entries == {}
    assert view.due() == []


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=0, max_size=80),
    st.lists(st.integers(0, 4), min_size=4, max_size=4),
    st.integers(1, 50),
)
def test_any_interleaving_of_the_partitions_gives_the_same_final_report(
    order: list[int], sizes: list[int], report_every: int
) -> None:
    """Partitions are read in any interleaving (each in its own order) and reported every few records (entries
    staged in between): the final window holds every partition's entries, once, all expired, and is final only
    after the last partition's marker."""
    logs = [_partition_log(p, sizes[p], final=True) for p in range(4)]
    cursors = [0] * 4
    merged: list[tuple[str, Any]] = []
    for p in order + [q for q in range(4) for _ in range(len(logs[q]))]:
        if cursors[p] < len(logs[p]):
            merged.append(logs[p][cursors[p]])
            cursors[p] += 1
    view = View(T, 4)
    finals: list[list[tuple[str, Any]]] = []
    for n, (key, value) in enumerate(merged, 1):
        _read(view, key, value)
        if n % report_every == 0 or n == len(merged):
            finals += [d.entries for d in view.due() if d.final]
    if not sum(sizes):
        assert finals == []
        return
    (entries,) = finals
    assert sorted(key for key, _ in entries) == sorted({key for log in logs for key, v in log if v and "p" in v})
    assert all(entry["x"] and entry["y"] == "1" for _, entry in entries)


def test_an_entry_past_its_partitions_sweep_is_reported_expired_without_its_expiry_record() -> None:
    """The join's expiry records carry a header the reader skips; the sweep marker before them tells."""
    key = pairs.entry_key("e1")
    view = _view([(key, _entry(1, T0 + 5000, None))])
    (due,) = view.due()
    assert due.entries[0][1]["x"] is False
    view.apply(pairs.sweep_key(1), {"swept": T0 + 5000 + T.ttl_ms + 1, "through": 1, "clocks": {}})
    view.dirty.add(T0)
    (due,) = view.due()
    assert due.entries[0][1]["x"] is True
    assert view.entries[key]["x"] is False  # the view's own entry is left as the changelog wrote it


def test_a_label_after_the_purge_leaves_the_final_window_whole() -> None:
    """The join purged a final window; a label for one of its events comes later (too late: a new label-only
    entry of the same key): the window's report still holds the purged entry."""
    log = _partition_log(0, 3, final=True)
    late = (pairs.entry_key("p0-e1"), {"p": 0, "o": 9, "t": None, "s": {}, "y": "1", "lt": PAST, "x": False})
    others = [r for p in (1, 2, 3) for r in _partition_log(p, 0, final=True)]
    view = _view([*log, late, *others])
    (due,) = view.due()
    assert due.final
    assert sorted(key for key, _ in due.entries) == [pairs.entry_key(f"p0-e{i}") for i in range(3)]
    assert all(entry["t"] is not None for _, entry in due.entries)
