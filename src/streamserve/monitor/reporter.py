"""The monitor's reporter: every partition's join state, read back from the join table's changelog, and the
window reports made from it.

The join is split over ``monitor.partitions`` partitions of the by-event topic, each owned by one monitor process
of the group, so no process holds the pairs of a whole window. Every change the joins make (entries, sweep and
final markers, deletions) is on the table's changelog, in order per partition: that log *is* the state. The
monitor process that owns by-event partition 0 also reports: a thread of it (``ChangelogReader``) reads every
partition of the changelog from its beginning into a ``View`` (no consumer group, nothing committed: a reporter
that takes over reads it again), and the report timer makes each changed window's reports from the view, exactly
as from one table: the pairs are the same, whichever process joined them, and a pair written twice to the
changelog (a join replayed after a SIGKILL) is one key, so it is never counted twice.

When is a window final? Each partition's sweep marker holds how far its event-time clock swept. A window
``[start, end)`` is final once every partition swept past ``end + label TTL`` (all its entries expired then, and
the join refuses later predictions for it) and every partition that has entries in it wrote its final marker
(``pairs.final_key``: written before that partition's entries of the window are deleted, with their count). The
view keeps a final window's entries until it is reported, then drops them. A reporter that starts after the
changelog was compacted may find a final window's entries gone: the counts in the markers tell, and that window,
reported before, is not reported again from part of its pairs.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from streamserve.errors import StreamServeError
from streamserve.monitor.join import partitions_of
from streamserve.monitor.pairs import ENTRY, FINAL, SWEEP, Entry, Timing, expiry

_ENTRY_KEY = b'"' + ENTRY.encode()

log = logging.getLogger(__name__)


def collect_less() -> None:
    """The garbage collector's settings for a monitor process. The join and the reporter build a dict or more per
    record and keep hundreds of thousands of them: at the default threshold (a young-generation pass every 700
    allocations, each older pass walking them all) the collector takes about a third of the reporter's time;
    every 50,000 allocations it takes little. Entries hold no cycles: reference counting frees them anyway."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@dataclass
class Due:
    """A window to report: its entries (key, entry) and whether the report is final."""

    window: int
    entries: list[tuple[str, Entry]]
    final: bool


@dataclass
class View:
    """The join table of every partition, as its changelog records make it (``apply``, in each partition's
    order), and the windows to report (``due``). Not thread-safe: the reader and the timer share it under
    ``lock``."""

    timing: Timing
    partitions: int
    """The join's partitions (``monitor.partitions``): a window is final once each of them swept past it."""
    entries: dict[str, Entry] = field(default_factory=dict)
    windows: dict[int, set[str]] = field(default_factory=dict)
    swept: dict[int, int] = field(default_factory=dict)
    """Per partition: how far its clock swept (its latest sweep marker)."""
    frozen: dict[int, dict[str, Entry]] = field(default_factory=dict)
    """Per window: the entries its partitions purged after marking it final, kept until it is reported (the key
    may come back meanwhile: a label after the TTL makes a new entry of the event)."""
    markers: dict[int, dict[int, int | None]] = field(default_factory=dict)
    """Per window: the partitions whose final marker came, with the count of entries they had in it."""
    dirty: set[int] = field(default_factory=set)
    reported: set[int] = field(default_factory=set)
    """Windows reported final (their entries dropped; later records for them are ignored)."""
    caught_up: bool = False
    """Whether the reader reached the changelog's end as it was when it started (logged; finals need not wait
    for it: a partition's sweep marker comes after every entry it swept, in the partition's order)."""
    records: int = 0
    pending: dict[bytes, bytes] = field(default_factory=dict)
    """Entry records read since the last ``due``, the last one per key, still encoded: an entry changed several
    times between two reports (its prediction, then its label) is decoded once."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def read(self, key: bytes | None, value: bytes | None) -> None:
        """One changelog record as the topic holds it (faust's JSON)."""
        if key is not None and key.startswith(_ENTRY_KEY):
            self.records += 1
            if value is not None:
                self.pending[key] = value
                return
            staged = self.pending.pop(key, None)  # a purge or a deletion: what it deletes must be in first
            name = _key(key)
            if staged is not None:
                self._entry(name, orjson.loads(staged))
            self._entry(name, None)
            return
        self.apply(_key(key), None if value is None else orjson.loads(value))

    def _settle(self) -> None:
        """Decode and apply the staged entry records."""
        pending, self.pending = self.pending, {}
        for key, value in pending.items():
            try:
                self._entry(_key(key), orjson.loads(value))
            except Exception:  # one record the view cannot use; the others still count
                log.exception("monitor reporter: changelog record of %r skipped", key[:80])

    def apply(self, key: str, value: Any) -> None:
        """One changelog record: ``value`` None deletes ``key``."""
        self.records += 1
        if key.startswith(ENTRY):
            self._entry(key, value)
        elif key.startswith(SWEEP) and isinstance(value, dict):
            swept = int(value["swept"])
            self.swept[int(key[len(SWEEP) :])] = swept
            span = self.timing.window_ms + self.timing.ttl_ms
            open_windows = self.windows.keys() | self.frozen.keys()
            self.dirty.update(window for window in open_windows if window + span <= swept)  # may be final now
        elif key.startswith(FINAL) and value is not None:
            window, partition = (int(part) for part in key[len(FINAL) :].split(":"))
            count = value.get("entries") if isinstance(value, dict) else None
            if window not in self.reported:
                self.markers.setdefault(window, {})[partition] = count if isinstance(count, int) else None
                self.dirty.add(window)

    def _entry(self, key: str, value: Any) -> None:
        old = self.entries.get(key)
        window_ms = self.timing.window_ms
        old_time = None if old is None else old.get("t")
        old_window = None if old_time is None else old_time - old_time % window_ms
        if value is None:
            if old is None:
                return
            self._drop(key, old_window)
            if old_window is not None and old["p"] in self.markers.get(old_window, ()):
                self.frozen.setdefault(old_window, {})[key] = old  # the purge of a final window: kept to report it
            return
        if value.__class__ is not dict or "p" not in value:
            return
        time_ms = value.get("t")
        window = None if time_ms is None else time_ms - time_ms % window_ms
        if window is not None and window in self.reported:
            return
        if old_window != window and old_window is not None:
            self._drop(key, old_window)
        self.entries[key] = value
        if window is not None:
            keys = self.windows.get(window)
            if keys is None:
                keys = self.windows[window] = set()
            keys.add(key)
            self.dirty.add(window)

    def _drop(self, key: str, window: int | None) -> None:
        self.entries.pop(key, None)
        keys = self.windows.get(window) if window is not None else None
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self.windows[window]  # type: ignore[arg-type]

    def final(self, window: int) -> bool:
        """Every partition swept past the window's end plus the TTL, and each with entries in it marked it final."""
        end = window + self.timing.window_ms + self.timing.ttl_ms
        if any(self.swept.get(partition, 0) < end for partition in range(self.partitions)):
            return False
        marked = self.markers.get(window, {})
        return all(int(self.entries[key]["p"]) in marked for key in self.windows.get(window, ()))

    def of(self, window: int) -> list[tuple[str, Entry]]:
        """The window's entries, those still in the table and those purged."""
        found = [(key, self.entries[key]) for key in self.windows.get(window, ())]
        return found + list(self.frozen.get(window, {}).items())

    def complete(self, window: int) -> bool:
        """Whether the view holds every entry the final markers of the window counted."""
        counts: dict[int, int] = {}
        for _, entry in self.of(window):
            partition = int(entry["p"])
            counts[partition] = counts.get(partition, 0) + 1
        return all(n is None or counts.get(p, 0) >= n for p, n in self.markers.get(window, {}).items())

    def due(self) -> list[Due]:
        """The windows changed since the last call, with their entries; a final one is dropped from the view."""
        self._settle()
        found = []
        for window in sorted(self.dirty):
            if window in self.reported:
                continue
            final = self.final(window)
            if final and not self.complete(window):
                log.info("window %d: final and reported before (its entries were compacted away); not again", window)
                self._done(window)
                continue
            entries = self.of(window)
            if entries and window + self.timing.ttl_ms <= max(self.swept.values(), default=0):
                entries = [(key, self._as_swept(entry)) for key, entry in entries]  # some may have expired
            if entries:
                found.append(Due(window, entries, final))
            if final:
                self._done(window)
        self.dirty.clear()
        return found

    def locked_due(self) -> list[Due]:
        """``due`` under the lock (from another thread than the reader's)."""
        with self.lock:
            return self.due()

    def _as_swept(self, entry: Entry) -> Entry:
        """The entry as its partition's sweep left it: expired once the clock passed its time plus the TTL (the
        join's expiry records are skipped: ``changelog.EXPIRY``)."""
        if entry["x"] or expiry(entry, self.timing.ttl_ms) >= self.swept.get(entry["p"], 0):
            return entry
        return {**entry, "x": True}

    def _done(self, window: int) -> None:
        self.reported.add(window)
        self.markers.pop(window, None)
        self.frozen.pop(window, None)
        for key in self.windows.pop(window, set()):
            self.entries.pop(key, None)


def _key(data: bytes | None) -> str:
    """A changelog key: the table's key as faust's JSON writes a string (without escapes: sliced)."""
    if data and data[:1] == b'"' and data[-1:] == b'"' and b"\\" not in data:
        return data[1:-1].decode()
    return str(orjson.loads(data or b'""'))


class ChangelogReader:
    """A thread reading every partition of the changelog topic into the view, from the beginning, until stopped."""

    def __init__(self, view: View, topic: str, config: dict[str, Any], batch: int = 2000) -> None:
        self.view = view
        self.topic = topic
        self.config = {
            **config,
            "group.id": f"{topic}-reporter",  # never joined nor committed: the partitions are assigned
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            # the changelog is read as fast as it can be: large fetches, and no 500 ms wait for a fetch to fill
            "fetch.wait.max.ms": 50,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "fetch.max.bytes": 100 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
        self.batch = batch
        self.stopping = threading.Event()
        self.failed: str | None = None
        self.thread = threading.Thread(target=self._run, name="monitor-reporter", daemon=True)

    def start(self) -> ChangelogReader:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)

    def _partitions(self, consumer: Consumer) -> list[TopicPartition]:
        """Every partition of the changelog from its beginning, once faust has created it."""
        while not self.stopping.is_set():
            try:
                return partitions_of(consumer, [self.topic], 10.0)
            except StreamServeError:
                self.stopping.wait(1.0)
        return []

    def _run(self) -> None:
        try:
            consumer = Consumer(self.config)
        except KafkaException as exc:
            self.failed = str(exc)
            log.error("monitor reporter: cannot read the changelog %s: %s", self.topic, exc)
            return
        try:
            self._read(consumer)
        except Exception as exc:  # the thread ends; the timer starts another reader (``Reporting.reader``)
            self.failed = str(exc)
            log.exception("monitor reporter: reading the changelog %s failed", self.topic)
        finally:
            consumer.close()

    def _read(self, consumer: Consumer) -> None:
        partitions = self._partitions(consumer)
        if not partitions:
            return
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions}
        behind = {p for p, end in ends.items() if end > 0}
        consumer.assign(partitions)
        view = self.view
        with view.lock:
            view.caught_up = not behind
        log.info("monitor reporter: reading the changelog %s (%d partitions)", self.topic, len(partitions))
        while not self.stopping.is_set():
            messages = consumer.consume(num_messages=self.batch, timeout=0.2)
            if not messages:
                if behind:  # the last records of a partition may be gone (compaction): its position tells
                    positions = consumer.position([TopicPartition(self.topic, p) for p in behind])
                    behind -= {tp.partition for tp in positions if tp.offset >= ends[tp.partition]}
                    if not behind:
                        with view.lock:
                            view.caught_up = True
                continue
            with view.lock:
                for message in messages:
                    if message.error() is not None:
                        log.warning("monitor reporter: %s", message.error())
                        continue
                    try:
                        if message.headers():  # an expiry only: the sweep marker before it told (View.due)
                            view.records += 1
                            continue
                        view.read(message.key(), message.value())
                    except Exception:  # one record the view cannot use; the next ones still count
                        log.exception(
                            "monitor reporter: changelog record %d/%d skipped", message.partition(), message.offset()
                        )
                    partition, offset = message.partition() or 0, message.offset() or 0
                    if behind and offset + 1 >= ends[partition]:
                        behind.discard(partition)
                if behind == set() and not view.caught_up:
                    view.caught_up = True
                    log.info("monitor reporter: read the changelog (%d records)", view.records)


class Reporting:
    """The reporter of one monitor process: a view and its reader while this process owns by-event partition 0."""

    def __init__(self, timing: Timing, partitions: int, topic: Callable[[], str], config: dict[str, Any]) -> None:
        self.timing = timing
        self.partitions = partitions
        self.topic = topic
        self.config = config
        self.view: View | None = None
        self._reader: ChangelogReader | None = None

    def reader(self) -> View:
        """The view, reading (a new reader when the last one failed)."""
        if self._reader is None or not self._reader.thread.is_alive():
            self.view = View(self.timing, self.partitions)
            self._reader = ChangelogReader(self.view, self.topic(), self.config).start()
        assert self.view is not None
        return self.view

    def stop(self) -> None:
        """No longer the reporter: the view goes."""
        if self._reader is not None:
            self._reader.stop()
            log.info("monitor reporter: stopped (by-event partition 0 is another process's now)")
        self._reader, self.view = None, None
