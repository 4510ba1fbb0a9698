"""Bundles: how the forwarders put many records on the monitor's by-event topic in one Kafka message.

faust pays a fixed cost per message it sends and per message an agent takes from a stream (an event object, a
send future, an ack, a commit entry): about as much as the join's own work on a record. So a forwarder sends one
message per partition of the by-event topic for each batch it took, holding every record of the batch bound for
that partition (a JSON list), and the join agent applies the records of a bundle one after another.

The partition of a record is a hash of its event id (crc32, stable across processes and versions), so both
sides of an event still meet in one partition. A record's place in the topic is its *position*: the bundle's
offset times ``SLOTS`` plus its index in the bundle; the join's replay guard (``pairs.apply``) compares
positions where it compared offsets, so a bundle replayed after a crash is applied once, record by record.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

SLOTS = 1 << 20
"""Positions per by-event offset: a bundle holds fewer records than this (a forwarder's batch)."""
MAX_BUNDLE_BYTES = 512 * 1024
"""A bundle larger than this (many classes' probabilities) is split in halves: under Kafka's 1 MiB default."""

Record = dict[str, Any]


def partition_of(event_id: str, partitions: int) -> int:
    """The by-event partition of an event id."""
    if partitions == 1:
        return 0
    return zlib.crc32(event_id.encode("utf-8", "surrogatepass")) % partitions


def position(offset: int, index: int) -> int:
    """A record's position: its bundle's offset and its index in the bundle, as one increasing number."""
    return offset * SLOTS + index


class Bundles:
    """A batch's records grouped by by-event partition (the event id rides in each record as ``id``)."""

    def __init__(self, partitions: int) -> None:
        self.partitions = partitions
        self.records: dict[int, list[Record]] = {}
        self.count = 0

    def add(self, event_id: str, record: Record) -> None:
        record["id"] = event_id
        self.records.setdefault(partition_of(event_id, self.partitions), []).append(record)
        self.count += 1

    def encoded(self) -> Iterator[tuple[int, bytes]]:
        """(partition, message value) for each bundle, in partition order."""
        for partition in sorted(self.records):
            yield from ((partition, value) for value in _encode(self.records[partition]))


def _encode(records: list[Record]) -> Iterator[bytes]:
    value = json.dumps(records, separators=(",", ":")).encode()
    if len(value) <= MAX_BUNDLE_BYTES or len(records) == 1:
        yield value
        return
    half = len(records) // 2
    yield from _encode(records[:half])
    yield from _encode(records[half:])


def decode(value: bytes | None) -> list[Record]:
    """A bundle's records; ValueError when the value is not one (the by-event topic is the monitor's own)."""
    if not value:
        raise ValueError("empty by-event message")
    try:
        records = json.loads(value)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"a by-event message is not JSON: {exc}") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) and isinstance(r.get("id"), str) for r in records):
        raise ValueError("a by-event message is not a list of records with ids")
    if len(records) >= SLOTS:
        raise ValueError(f"a by-event message of {len(records)} records (at most {SLOTS - 1})")
    return records
