"""Event-time windows and the aggregates folded over them, per entity: pure logic, no faust, no Redis.

Windows are aligned on the epoch and measured in integer milliseconds, so a window's bounds are exact (faust's
own windows work in float seconds and end 0.1 s early). A window of ``size_ms`` hopping by ``hop_ms`` starts at
every multiple of ``hop_ms``; a tumbling window hops by its size. The *current* window of a time ``t`` is the one
holding ``t`` that started first: ``[end - size_ms, end)`` with ``end`` the first hop boundary after ``t``, i.e.
"the last ``size_ms`` up to ``t``" at the resolution of one hop.

What an entity's Redis entry holds (see EntityState.current): for each aggregate, its value over the current
window of the latest event time the entity has seen. Older windows are dropped as time moves on: they can never
be written again. The aggregates are exact whatever the order of arrival (sums keep Shewchuk's partials, like
``math.fsum``), which is what lets a test compare them with a reference computed over the same events.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Function = Literal["count", "sum", "mean", "min", "max", "distinct_count"]
FUNCTIONS: tuple[Function, ...] = ("count", "sum", "mean", "min", "max", "distinct_count")
NUMERIC_FUNCTIONS = frozenset({"sum", "mean", "min", "max"})


@dataclass(frozen=True, slots=True)
class Window:
    """Epoch-aligned windows of ``size_ms`` starting every ``hop_ms`` (tumbling when they are equal)."""

    size_ms: int
    hop_ms: int

    def current(self, time_ms: int) -> int:
        """Start of the window holding ``time_ms`` that started first (it ends at the first hop boundary after)."""
        return ((time_ms - self.size_ms) // self.hop_ms) * self.hop_ms + self.hop_ms

    def starts(self, time_ms: int) -> range:
        """Starts of every window holding ``time_ms``, oldest first."""
        return range(self.current(time_ms), (time_ms // self.hop_ms) * self.hop_ms + 1, self.hop_ms)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate of one entity key template: its name, function and window."""

    name: str
    function: Function
    window: Window


def _add_partial(partials: list[float], value: float) -> None:
    """Add ``value`` to the non-overlapping partials of an exact sum (Shewchuk; the recipe behind math.fsum)."""
    kept = 0
    for other in partials:
        if abs(value) < abs(other):
            value, other = other, value
        high = value + other
        low = other - (high - value)
        if low:
            partials[kept] = low
            kept += 1
        value = high
    partials[kept:] = [value]


def exact_sum(partials: Iterable[float]) -> float:
    """The correctly rounded sum of partials; NaN when it overflowed (the worker reads NaN as missing)."""
    try:
        return math.fsum(partials)
    except (OverflowError, ValueError):
        return math.nan


def new_accumulator(function: Function) -> list[Any]:
    """An empty window: [events] plus what the function keeps (partials, extreme, distinct values)."""
    if function in ("sum", "mean"):
        return [0, []]
    if function == "distinct_count":
        return [0, []]
    if function in ("min", "max"):
        return [0, None]
    return [0]


def accumulate(function: Function, accumulator: list[Any], value: Any) -> None:
    """Fold one event's value (a float, a text for distinct_count, None for count) into a window."""
    accumulator[0] += 1
    if function in ("sum", "mean"):
        _add_partial(accumulator[1], value)
    elif function == "min":
        accumulator[1] = value if accumulator[1] is None else min(accumulator[1], value)
    elif function == "max":
        accumulator[1] = value if accumulator[1] is None else max(accumulator[1], value)
    elif function == "distinct_count" and value not in accumulator[1]:
        accumulator[1].append(value)


def result(function: Function, accumulator: list[Any] | None) -> float | None:
    """The aggregate of a window (None: no value, e.g. the mean of no event; count and sum of nothing are 0)."""
    events = 0 if accumulator is None else accumulator[0]
    if function == "count":
        return float(events)
    if accumulator is None or events == 0:
        return 0.0 if function in ("sum", "distinct_count") else None
    if function == "sum":
        return exact_sum(accumulator[1])
    if function == "mean":
        return exact_sum(accumulator[1]) / events
    if function == "distinct_count":
        return float(len(accumulator[1]))
    return float(accumulator[1])


@dataclass(slots=True)
class EntityState:
    """What the app keeps per entity key (a faust table value): windows, latest event time, offsets applied.

    ``applied`` counts the events folded in; with ``latest_ms`` it orders two states of one entity, so the Redis
    write can refuse an older one (see streaming/store.py). ``offsets`` holds the last input offset applied per
    partition: an event redelivered after a crash (its offset not yet committed) is recognised and not counted
    twice, however the changelog and the commit interleaved.
    """

    latest_ms: int | None = None
    applied: int = 0
    offsets: dict[str, int] = field(default_factory=dict)
    windows: dict[str, dict[int, list[Any]]] = field(default_factory=dict)
    late: int = 0

    def seen(self, partition: int, offset: int) -> bool:
        """True when this input record was applied already (a redelivery)."""
        return offset <= self.offsets.get(str(partition), -1)

    def apply(
        self,
        aggregates: Mapping[str, Aggregate],
        partition: int,
        offset: int,
        time_ms: int,
        values: Mapping[str, Any],
    ) -> bool:
        """Fold one event into the windows of the aggregates it feeds (``values``: name -> value); False when it
        was applied already. Windows older than each aggregate's current one are dropped, never created."""
        if self.seen(partition, offset):
            return False
        self.offsets[str(partition)] = offset
        self.applied += 1
        self.latest_ms = time_ms if self.latest_ms is None else max(self.latest_ms, time_ms)
        too_late = True
        for name, aggregate in aggregates.items():
            oldest = aggregate.window.current(self.latest_ms)
            windows = self.windows.setdefault(name, {})
            for start in [s for s in windows if s < oldest]:
                del windows[start]
            if name not in values:
                continue
            for start in aggregate.window.starts(time_ms):
                if start >= oldest:
                    too_late = False
                    accumulator = windows.get(start)
                    if accumulator is None:
                        accumulator = windows[start] = new_accumulator(aggregate.function)
                    accumulate(aggregate.function, accumulator, values[name])
        if too_late and values:
            self.late += 1
        return True

    def current(self, aggregates: Mapping[str, Aggregate]) -> dict[str, float | None]:
        """Each aggregate over the current window of the latest event time (None: no value to show)."""
        if self.latest_ms is None:
            return {}
        latest = self.latest_ms
        return {
            name: result(a.function, self.windows.get(name, {}).get(a.window.current(latest)))
            for name, a in aggregates.items()
        }

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-friendly values (the faust table's value)."""
        return {
            "t": self.latest_ms,
            "n": self.applied,
            "o": self.offsets,
            "late": self.late,
            "w": {name: [[start, *acc] for start, acc in windows.items()] for name, windows in self.windows.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> EntityState:
        """The state back from its JSON form (a fresh state for None)."""
        if not data:
            return cls()
        windows = {name: {int(row[0]): list(row[1:]) for row in rows} for name, rows in data.get("w", {}).items()}
        return cls(data.get("t"), int(data.get("n", 0)), dict(data.get("o", {})), windows, int(data.get("late", 0)))
