"""The join of predictions with labels by event id: one entry per event, changed by pure functions.

The monitor's faust agent keeps the entries in a table keyed by event id (its changelog is the state a
restarted monitor recovers) and calls these functions; everything that makes the join exact lives here:

- **Either side may come first.** A label waits for its predictions as a prediction waits for its label.
- **Event time, with a TTL.** Each partition keeps a clock per source (a partition of the predictions, shadow
  or labels topic): the latest event time of its predictions, label time of its labels. The partition's event
  time is the oldest of the clocks of the sources that sent something in the last ``idle_ms`` of processing time
  (so a monitor catching up on a backlog, reading one topic or partition faster than another, never counts a
  label as missing because it read the predictions first; a source that went quiet stops holding it back), and
  it advances in steps (``sweep_ms``). When it passes an entry's time plus the label TTL, the entry expires:
  predictions without a label count as never labelled; a label that found no prediction is a label for an
  unknown event id. A label for an expired entry is too late to count.
- **Windows.** An event belongs to the tumbling window of its time; a window's report is final once every
  entry in it expired. Its entries are then purged, after a marker holding the final report is written to the
  same changelog partition (so a restarted monitor never recomputes a window from half of its entries).
- **Idempotent.** Each entry remembers the position (bundles.py: the by-event offset and the index in its bundle)
  of the last record of the monitor's by-event topic applied to it: a record replayed after a crash (its offset
  not committed although its effect reached the changelog) is
  applied once. A prediction re-sent by a restarted worker or forwarder lands in the same slot (model, version,
  role), a label re-forwarded carries the same origin (topic/partition/offset of the labels topic). No pair is
  ever counted twice; a second label from another record is a duplicate and is dead-lettered.

Entries are JSON-able dicts (short keys: the changelog holds one per event):
``p`` partition, ``o`` last applied position, ``t`` event time (ms; None until a prediction came),
``s`` slots {"<role>|<model>|<version>": prediction}, ``y`` label, ``lt`` label time, ``lo`` label origin,
``raw`` the label record's bytes (base64, for the dead-letter topic) until it joins, ``x`` expired.
"""

from __future__ import annotations

import base64
import heapq
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ENTRY = "e:"
SWEEP = "m:sweep:"
FINAL = "m:final:"

Entry = dict[str, Any]


def entry_key(event_id: str) -> str:
    return ENTRY + event_id


def sweep_key(partition: int) -> str:
    """Marker of a partition's swept event time and the offset it was swept at."""
    return f"{SWEEP}{partition}"


def final_key(window: int, partition: int) -> str:
    """Marker of a final window in a partition: its reports, written before the window's entries go."""
    return f"{FINAL}{window}:{partition}"


def partition_of_key(key: str, value: Any) -> int | None:
    """The table partition a key of the join table belongs to (an entry's ``p``, a marker's last number)."""
    if key.startswith(ENTRY):
        return int(value["p"]) if isinstance(value, dict) and "p" in value else None
    if key.startswith((SWEEP, FINAL)):
        return int(key.rsplit(":", 1)[1])
    return None


@dataclass(frozen=True)
class Timing:
    window_ms: int
    ttl_ms: int
    sweep_ms: int

    def window(self, time_ms: int) -> int:
        return time_ms - time_ms % self.window_ms

    def boundary(self, time_ms: int) -> int:
        return time_ms - time_ms % self.sweep_ms


@dataclass(frozen=True)
class Effect:
    """Something beside the entry's new value: a count, a histogram sample, a dead letter."""

    kind: str
    """joined, never_labelled, late_prediction, or a label rejection of labels.REASONS."""
    slot: str | None = None
    message: str = ""
    raw: bytes | None = None
    origin: str | None = None
    lag_ms: int | None = None


def prediction_message(origin: str, role: str, record: Mapping[str, Any], time_ms: int) -> dict[str, Any]:
    """What the forwarder puts on the by-event topic for one prediction record."""
    predicted = record.get("predicted_class")
    if predicted is None and record.get("label") is not None:
        predicted = str(record["label"])
    probabilities = record.get("probabilities")
    return {
        "k": "p",
        "o": origin,
        "r": role,
        "m": record["model_name"],
        "v": record["model_version"],
        "s": float(record["score"]),
        "c": predicted,
        "pr": dict(probabilities) if probabilities else None,
        "t": time_ms,
    }


def finite(message: Mapping[str, Any]) -> bool:
    """Whether a prediction message's score and probabilities are numbers (NaN or infinity would make every
    report of its window fail, and JSON has no such number)."""
    values = [message["s"], *(message["pr"] or {}).values()]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def label_message(origin: str, value: str | float, time_ms: int, raw: bytes) -> dict[str, Any]:
    """What the forwarder puts on the by-event topic for one usable label."""
    return {"k": "l", "o": origin, "y": value, "lt": time_ms, "raw": base64.b64encode(raw).decode()}


def slot_of(message: Mapping[str, Any]) -> str:
    return f"{message['r']}|{message['m']}|{message['v']}"


def raw_bytes(entry_or_message: Mapping[str, Any]) -> bytes | None:
    raw = entry_or_message.get("raw")
    return base64.b64decode(raw) if raw else None


def expiry(entry: Mapping[str, Any], ttl_ms: int) -> int:
    base = entry["t"] if entry.get("t") is not None else entry["lt"]
    return int(base) + ttl_ms


def _unknown_class(entry: Mapping[str, Any]) -> str | None:
    """Why the entry's label is no class of its predictions (their probability maps name the classes)."""
    label = entry.get("y")
    for prediction in entry["s"].values():
        classes = prediction.get("pr")
        if classes and isinstance(label, str) and label not in classes:
            return f"label {label!r} is none of the model's classes {sorted(classes)}"
    return None


def _joined(entry: Entry, slots: Iterable[str]) -> list[Effect]:
    """The label met predictions: its bytes, kept to dead-letter it (unknown event id, no such class), go (the
    changelog and the reporter read the entry without them; a later prediction of a version without the label's
    class dead-letters it by its origin only)."""
    entry["raw"] = None
    lag = int(entry["lt"]) - int(entry["t"])
    return [Effect("joined", slot=slot, lag_ms=lag) for slot in slots]


def _reject_label(entry: Entry, reason: str, message: str) -> tuple[Entry, list[Effect]]:
    effect = Effect(reason, message=message, raw=raw_bytes(entry), origin=entry.get("lo"))
    for key in ("y", "lt", "lo", "raw"):
        entry[key] = None
    return entry, [effect]


def _apply_prediction(
    entry: Entry | None, message: Mapping[str, Any], swept_ms: int, timing: Timing, final: set[int]
) -> tuple[Entry | None, list[Effect]]:
    time_ms = int(message["t"])
    slot = slot_of(message)
    if timing.window(time_ms) in final or (entry is None and time_ms + timing.ttl_ms < swept_ms):
        reason = "its window is final" if timing.window(time_ms) in final else "it is older than the label TTL"
        return None, [Effect("late_prediction", slot=slot, message=reason, origin=message["o"])]
    prediction = {key: message[key] for key in ("r", "m", "v", "s", "c", "pr")}
    if entry is None:
        entry = {"t": time_ms, "s": {}, "y": None, "lt": None, "lo": None, "raw": None, "x": False}
    elif entry.get("t") is None:
        entry["t"] = time_ms
    known = entry["s"].get(slot) == prediction
    entry["s"][slot] = prediction
    if entry.get("y") is None or known:
        return entry, []
    problem = _unknown_class(entry)
    if problem is not None:
        return _reject_label(entry, "wrong_type", problem)
    return entry, _joined(entry, [slot])


def _apply_label(entry: Entry | None, message: Mapping[str, Any]) -> tuple[Entry | None, list[Effect]]:
    origin = message["o"]
    if entry is not None and entry.get("lo") == origin:
        return entry, []  # the same label record, forwarded again
    if entry is not None and entry.get("y") is not None:
        return entry, [
            Effect(
                "duplicate", message=f"event already labelled by {entry['lo']}", raw=raw_bytes(message), origin=origin
            )
        ]
    if entry is not None and entry.get("x"):
        return entry, [
            Effect("expired", message="the label came after the label TTL", raw=raw_bytes(message), origin=origin)
        ]
    if entry is None:
        entry = {"t": None, "s": {}, "y": None, "lt": None, "lo": None, "raw": None, "x": False}
    entry.update({"y": message["y"], "lt": int(message["lt"]), "lo": origin, "raw": message["raw"]})
    if not entry["s"]:
        return entry, []
    problem = _unknown_class(entry)
    if problem is not None:
        return _reject_label(entry, "wrong_type", problem)
    return entry, _joined(entry, entry["s"])


def apply(
    entry: Entry | None,
    message: Mapping[str, Any],
    partition: int,
    offset: int,
    swept_ms: int,
    timing: Timing,
    final: set[int],
) -> tuple[Entry | None, list[Effect]]:
    """The entry after one by-event record (None: leave the table as it is) and the effects to carry out.

    ``entry`` is not changed in place: the table's value is only ever replaced.
    """
    if entry is not None and int(entry.get("o", -1)) >= offset:
        return None, []  # replayed: its effect is in the entry already
    current = None if entry is None else {**entry, "s": dict(entry["s"])}
    if message.get("k") == "p":
        new, effects = _apply_prediction(current, message, swept_ms, timing, final)
    else:
        new, effects = _apply_label(current, message)
    if new is not None:
        new["p"] = partition
        new["o"] = offset
    return new, effects


def expire(entry: Mapping[str, Any]) -> tuple[Entry | None, list[Effect]]:
    """The entry once past its TTL (None: delete it) and its effects."""
    if not entry["s"]:
        message = "no prediction with this event id came within the label TTL"
        return None, [Effect("unknown_event", message=message, raw=raw_bytes(entry), origin=entry.get("lo"))]
    expired = {**entry, "x": True, "raw": None}
    if entry.get("y") is not None:
        return expired, []
    return expired, [Effect("never_labelled", slot=slot) for slot in entry["s"]]


@dataclass
class Index:
    """In-memory views of the table, rebuilt from it after a (re)start or a rebalance: the keys of each window,
    each partition's entries by expiry, the swept time and offset of each partition, the final windows."""

    timing: Timing
    windows: dict[int, set[str]] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    heaps: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    swept: dict[int, int] = field(default_factory=dict)
    through: dict[int, int] = field(default_factory=dict)
    clocks: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """Per partition: per source (topic/partition), [latest time seen, processing time it was seen]."""
    offsets: dict[int, int] = field(default_factory=dict)
    """Per partition: the last offset applied (the "through" of a sweep the timer makes)."""
    finals: dict[int, Any] = field(default_factory=dict)
    purged: dict[int, set[int]] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    scheduled: dict[str, int] = field(default_factory=dict)
    """The expiry each open entry is in its partition's heap under (older heap items are stale)."""

    def rebuild(self, items: Iterable[tuple[str, Any]], owned: Iterable[int] = (), sources: Iterable[str] = ()) -> None:
        """The views of the table's ``items``; each ``owned`` partition's clocks wait ``idle_s`` for every one of the
        ``sources`` (a partition of an input topic) before they move on without it: after a restart or a
        rebalance, input partitions another process was forwarding (or that it never got to) resume here, and
        entries must not expire before their records come. A source that sends nothing meanwhile stops
        holding the clock back, as any quiet one."""
        for name in ("windows", "partitions", "heaps", "swept", "through", "clocks", "offsets", "finals", "purged"):
            getattr(self, name).clear()
        self.scheduled.clear()
        self.dirty.clear()
        for key, value in items:
            if key.startswith(ENTRY) and isinstance(value, dict):
                self.add(key, value)
            elif key.startswith(SWEEP) and isinstance(value, dict):
                partition = int(key[len(SWEEP) :])
                self.swept[partition] = int(value["swept"])
                self.through[partition] = int(value["through"])
                self.offsets[partition] = int(value["through"])
                restarted = time.monotonic()  # a restored source counts as active until it has had time to resume
                self.clocks[partition] = {src: [float(t), restarted] for src, t in value.get("clocks", {}).items()}
            elif key.startswith(FINAL):
                window, partition = (int(part) for part in key[len(FINAL) :].split(":"))
                self.finals[window] = value
                self.purged.setdefault(window, set()).add(partition)
        restarted = time.monotonic()
        for partition in owned:
            clocks = self.clocks.setdefault(partition, {})
            for source in sources:
                clocks.setdefault(source, [0.0, restarted])  # not seen yet: holds the clock until it sends or idles

    def add(self, key: str, entry: Mapping[str, Any]) -> None:
        partition = int(entry["p"])
        self.partitions[key] = partition
        if entry.get("t") is not None:
            window = self.timing.window(int(entry["t"]))
            self.windows.setdefault(window, set()).add(key)
            self.dirty.add(window)
        if entry.get("x"):
            self.scheduled.pop(key, None)
            return
        expires = expiry(entry, self.timing.ttl_ms)
        if self.scheduled.get(key) != expires:
            self.scheduled[key] = expires
            heapq.heappush(self.heaps.setdefault(partition, []), (expires, key))

    def discard(self, key: str, entry: Mapping[str, Any]) -> None:
        self.partitions.pop(key, None)
        self.scheduled.pop(key, None)
        if entry.get("t") is not None:
            window = self.timing.window(int(entry["t"]))
            keys = self.windows.get(window)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self.windows[window]

    def tick(self, partition: int, offset: int, message: Mapping[str, Any]) -> None:
        """Advance the clock of the record's source in its partition."""
        source = str(message["o"]).rsplit("/", 1)[0]
        stamp = int(message["t"]) if message.get("k") == "p" else int(message["lt"])
        clock = self.clocks.setdefault(partition, {}).setdefault(source, [float(stamp), 0.0])
        clock[0] = max(clock[0], float(stamp))
        clock[1] = time.monotonic()
        self.offsets[partition] = offset

    def boundary(self, partition: int, idle_s: float) -> int:
        """The sweep boundary the partition's clocks allow now (0: none yet)."""
        clocks = self.clocks.get(partition)
        if not clocks:
            return 0
        now = time.monotonic()
        active = [t for t, seen in clocks.values() if now - seen <= idle_s]
        return self.timing.boundary(int(min(active) if active else max(t for t, _ in clocks.values())))

    def sweep_marker(self, partition: int) -> dict[str, Any]:
        clocks = {source: int(t) for source, (t, _) in self.clocks.get(partition, {}).items() if t > 0}
        return {
            "swept": self.swept.get(partition, 0),
            "through": self.offsets.get(partition, -1),
            "clocks": clocks,
        }

    def due(self, partition: int, boundary: int) -> list[str]:
        """Keys of the partition whose entries may have expired before ``boundary`` (check each entry)."""
        heap = self.heaps.get(partition, [])
        keys = []
        while heap and heap[0][0] < boundary:
            expires, key = heapq.heappop(heap)
            if self.scheduled.get(key) == expires:
                del self.scheduled[key]
                keys.append(key)
        return keys

    def purgeable(self, partition: int) -> list[int]:
        """Windows final in this partition whose entries in it are still to be purged: its clock swept past their
        end plus the TTL, so every entry of theirs expired and any later prediction for them is late."""
        swept = self.swept.get(partition, 0)
        span = self.timing.window_ms + self.timing.ttl_ms
        return [
            window
            for window in sorted(self.windows)
            if window + span <= swept and partition not in self.purged.get(window, set())
        ]

    def final_in(self, partition: int) -> set[int]:
        """The windows final (purged) in this partition: predictions for them are late."""
        return {window for window, done in self.purged.items() if partition in done}

    def keys_of(self, window: int, partition: int) -> list[str]:
        return [key for key in self.windows.get(window, ()) if self.partitions.get(key) == partition]
