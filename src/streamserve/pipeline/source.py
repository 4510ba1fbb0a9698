"""Input source: a consumer-group member reading the input topic in micro-batch sized polls."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamserve.records import Headers, Source

log = logging.getLogger(__name__)

CONSUMER_DEFAULTS: dict[str, str | int | float | bool] = {
    "enable.auto.commit": False,  # offsets are committed after outputs are acknowledged
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 10_000,
    "fetch.wait.max.ms": 10,
    "isolation.level": "read_committed",  # never score records of an upstream transaction that aborted
    "queued.max.messages.kbytes": 16_384,  # bounds prefetched input: memory stays flat when we pause
}

RevokeCallback = Callable[[list[TopicPartition]], None]


class KafkaSource:
    """Subscribes to the input topic; on revoke, lets the worker finish and commit first."""

    def __init__(self, consumer_config: dict[str, str | int | float | bool], topic: str) -> None:
        self.consumer = Consumer({**CONSUMER_DEFAULTS, **consumer_config})
        self.topic = topic
        self.assignment: set[tuple[str, int]] = set()
        self.joined = False
        """Set once the group has answered with a first assignment (readiness)."""
        self._on_revoke: RevokeCallback | None = None
        self._on_lost: RevokeCallback | None = None

    def start(self, on_revoke: RevokeCallback, on_lost: RevokeCallback | None = None) -> None:
        """Join the group."""
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment.update((tp.topic, tp.partition) for tp in partitions)
        self.joined = True
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoking %s", sorted(tp.partition for tp in partitions))
        if self._on_revoke is not None:
            self._on_revoke(partitions)
        self.assignment.difference_update((tp.topic, tp.partition) for tp in partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: nothing of theirs may be committed.
        log.warning("lost %s", sorted(tp.partition for tp in partitions))
        if self._on_lost is not None:
            self._on_lost(partitions)
        self.assignment.difference_update((tp.topic, tp.partition) for tp in partitions)

    def poll(self, max_records: int, timeout: float) -> list[Source]:
        """Up to max_records input records, waiting at most timeout seconds."""
        messages: list[Message] = self.consumer.consume(num_messages=max_records, timeout=timeout)
        sources = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            _, timestamp = msg.timestamp()
            sources.append(
                Source(
                    cast(str, msg.topic()),
                    cast(int, msg.partition()),
                    cast(int, msg.offset()),
                    msg.key(),
                    msg.value(),
                    cast("Headers | None", msg.headers()),
                    timestamp,
                )
            )
        return sources

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        """Commit offsets of partitions this member still owns."""
        owned = [tp for tp in offsets if (tp.topic, tp.partition) in self.assignment]
        if not owned:
            return
        try:
            if asynchronous:
                self.consumer.commit(offsets=owned, asynchronous=True)
            else:
                self.consumer.commit(offsets=owned, asynchronous=False)
        except KafkaException as exc:
            # A commit racing a rebalance fails; the new owner re-reads from the last commit (at-least-once).
            log.warning("commit of %s failed: %s", [(tp.partition, tp.offset) for tp in owned], exc)

    def _assigned_partitions(self) -> list[TopicPartition]:
        return [TopicPartition(topic, partition) for topic, partition in sorted(self.assignment)]

    def pause(self) -> None:
        """Stop fetching from every assigned partition (backpressure)."""
        self.consumer.pause(self._assigned_partitions())
        log.info("paused %d partitions: outputs not acknowledged fast enough", len(self.assignment))

    def resume(self) -> None:
        """Fetch again from where each partition stopped."""
        self.consumer.resume(self._assigned_partitions())
        log.info("resumed %d partitions", len(self.assignment))

    def seek(self, positions: dict[tuple[str, int], int]) -> None:
        """Read the given partitions again from the given offsets (those still assigned)."""
        for (topic, partition), offset in positions.items():
            if (topic, partition) not in self.assignment:
                continue  # moved to another member: it starts from the committed offset
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                log.warning("seek %s[%d] to %d failed: %s", topic, partition, offset, exc)

    def close(self) -> None:
        """Leave the group."""
        self.consumer.close()
