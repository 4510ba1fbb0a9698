"""Reading a range of a topic's history outside any consumer group: the backtest's input, the dead letters.

A range is given per partition as [start, end) offsets, from positions an operator writes: a time (ISO 8601,
``now``, or ``-2h`` / ``-30m`` / ``-7d`` before now), ``beginning``, ``end``, or offsets
``PARTITION:OFFSET[,PARTITION:OFFSET...]``. The reader assigns partitions itself (no subscription, no group
membership) and never commits, so the pipeline's consumer group and its offsets are untouched. It reads with
``isolation.level=read_committed`` and follows the consumer's position, so transaction markers (which have
offsets but are never delivered) do not keep it waiting.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from streamserve.errors import ConfigError
from streamserve.records import Source

LibrdkafkaConfig = dict[str, str | int | float | bool]
READER_GROUP_PREFIX = "streamserve-history-"
"""Group id of history readers: never joined (partitions are assigned) and never committed."""
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_OFFSETS = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a range starts or ends: a time (epoch ms), explicit offsets per partition, or an edge."""

    time_ms: int | None = None
    offsets: dict[int, int] | None = None
    edge: str | None = None
    """``beginning`` or ``end``."""
    text: str = ""


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets [start, end) of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        """Offsets in the range (records, less any transaction markers)."""
        return max(self.end - self.start, 0)


def parse_position(text: str, now_ms: int | None = None) -> Position:
    """An operator's --from/--to/--since: a time, ``beginning``, ``end``, or PARTITION:OFFSET pairs."""
    spec = text.strip()
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if spec in ("beginning", "end"):
        return Position(edge=spec, text=spec)
    if spec == "now":
        return Position(time_ms=now, text=spec)
    if _OFFSETS.match(spec):
        offsets = {int(p): int(o) for p, o in (pair.split(":") for pair in spec.split(","))}
        return Position(offsets=offsets, text=spec)
    relative = _RELATIVE.match(spec)
    if relative:
        delta = timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
        return Position(time_ms=now - int(delta.total_seconds() * 1000), text=spec)
    try:
        moment = datetime.fromisoformat(spec)
    except ValueError:
        raise ConfigError(
            f"position {text!r}: give a time (ISO 8601 like 2026-12-06T10:00:00Z, now, -2h, -30m, -7d), "
            "beginning, end, or offsets PARTITION:OFFSET[,PARTITION:OFFSET...]"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # a time without a zone is UTC, as Kafka's timestamps are
    return Position(time_ms=int(moment.timestamp() * 1000), text=spec)


def reader(config: LibrdkafkaConfig, purpose: str = "reader") -> Consumer:
    """A consumer that is assigned partitions, never joins its group, never commits, reads committed records."""
    return Consumer(
        {
            **config,
            "group.id": f"{READER_GROUP_PREFIX}{purpose}-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
    )


def partitions_of(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    """The topic's partitions; ConfigError when it does not exist."""
    metadata = consumer.list_topics(topic, timeout=timeout_s)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ConfigError(f"topic {topic} does not exist (or has no partitions) on the brokers")
    return sorted(found.partitions)


def resolve_range(
    consumer: Consumer, topic: str, start: Position, end: Position, timeout_s: float = 10.0
) -> list[PartitionRange]:
    """Per partition, the offsets [start, end) the two positions name (empty partitions left out)."""
    partitions = partitions_of(consumer, topic, timeout_s)
    if start.offsets is not None:
        unknown = sorted(set(start.offsets) - set(partitions))
        if unknown:
            raise ConfigError(f"{topic} has no partition {unknown[0]} (partitions 0..{max(partitions)})")
        partitions = sorted(start.offsets)  # offsets name the partitions read
    marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s) for p in partitions}
    starts = _offsets(consumer, topic, start, marks, timeout_s, default_edge="beginning")
    ends = _offsets(consumer, topic, end, marks, timeout_s, default_edge="end")
    ranges = [PartitionRange(p, starts[p], ends[p]) for p in partitions]
    return [r for r in ranges if r.size > 0]


def _offsets(
    consumer: Consumer,
    topic: str,
    position: Position,
    marks: dict[int, tuple[int, int]],
    timeout_s: float,
    default_edge: str,
) -> dict[int, int]:
    """The offset of a position in each partition, clamped to what the partition holds."""
    low = {p: int(m[0]) for p, m in marks.items()}
    high = {p: int(m[1]) for p, m in marks.items()}
    if position.time_ms is not None:
        asked = [TopicPartition(topic, p, position.time_ms) for p in marks]
        found = consumer.offsets_for_times(asked, timeout=timeout_s)
        # -1: no record at or after that time in the partition: the range ends (or starts) at its end.
        wanted = {tp.partition: high[tp.partition] if tp.offset < 0 else tp.offset for tp in found}
    elif position.offsets is not None:
        wanted = {p: position.offsets.get(p, low[p] if default_edge == "beginning" else high[p]) for p in marks}
    else:
        edge = position.edge or default_edge
        wanted = dict(low if edge == "beginning" else high)
    return {p: min(max(wanted[p], low[p]), high[p]) for p in marks}


def read_range(
    consumer: Consumer,
    topic: str,
    ranges: Sequence[PartitionRange],
    batch_size: int = 1000,
    idle_timeout_s: float = 30.0,
) -> Iterator[list[Source]]:
    """The records of the ranges in batches of at most batch_size (each partition in offset order).

    Raises TimeoutError when no record arrives for idle_timeout_s while records are still expected.
    """
    remaining = {r.partition: r for r in ranges if r.size > 0}
    if not remaining:
        return
    consumer.assign([TopicPartition(topic, r.partition, r.start) for r in remaining.values()])
    last_progress = time.monotonic()
    try:
        while remaining:
            batch: list[Source] = []
            for msg in consumer.consume(num_messages=batch_size, timeout=0.5):
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    continue
                partition, offset = msg.partition() or 0, msg.offset()
                wanted = remaining.get(partition)
                if wanted is None or offset is None or offset >= wanted.end:
                    continue
                headers = msg.headers()  # librdkafka gives a list of (name, value) pairs, or None
                timestamp = msg.timestamp()[1]
                batch.append(
                    Source(topic, partition, offset, msg.key(), msg.value(), headers, int(timestamp))  # type: ignore[arg-type]
                )
            if batch:
                last_progress = time.monotonic()
                yield batch
            _drop_finished(consumer, topic, remaining, batch)
            if remaining and time.monotonic() - last_progress > idle_timeout_s:
                left = ", ".join(f"{p}@{consumer_position(consumer, topic, p)}<{r.end}" for p, r in remaining.items())
                raise TimeoutError(f"{topic}: no records for {idle_timeout_s:.0f}s while reading ({left})")
    finally:
        consumer.unassign()


def consumer_position(consumer: Consumer, topic: str, partition: int) -> int:
    """The consumer's next offset in a partition (-1 when it has none yet)."""
    return int(consumer.position([TopicPartition(topic, partition)])[0].offset)


def _drop_finished(consumer: Consumer, topic: str, remaining: dict[int, PartitionRange], batch: list[Source]) -> None:
    """Forget the partitions read to their end: by the records seen, or by the position (past markers)."""
    seen = {source.partition: source.offset + 1 for source in batch}
    for partition, wanted in list(remaining.items()):
        position = max(seen.get(partition, -1), consumer_position(consumer, topic, partition))
        if position >= wanted.end:
            del remaining[partition]
