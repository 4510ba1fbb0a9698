"""Output sink: the idempotent producer, delivery tracking and in-order offset commits.

An input offset is committed only after every record produced for its batch (predictions and
dead letters alike) was acknowledged by the broker. Batches are acknowledged out of order across
partitions, so the tracker commits the longest prefix of fully acknowledged batches.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from streamserve.errors import DeliveryError
from streamserve.records import Headers, Source

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, str | int | float | bool] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",  # same partition for a key as the Java client
    "queue.buffering.max.messages": 200_000,
}


@dataclass(slots=True)
class InflightBatch:
    """Records of one micro-batch awaiting acknowledgement, and the input offsets they release."""

    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    pending: int = 0
    sealed: bool = False
    error: str | None = None

    def cover(self, sources: Iterable[Source]) -> None:
        """Record the input positions this batch releases once acknowledged."""
        for source in sources:
            tp = (source.topic, source.partition)
            if source.offset + 1 > self.next_offsets.get(tp, -1):
                self.next_offsets[tp] = source.offset + 1

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        """librdkafka delivery report for one record of this batch."""
        self.pending -= 1
        if err is not None and self.error is None:
            self.error = f"{msg.topic()}: {err}"

    @property
    def done(self) -> bool:
        """All records were produced and acknowledged."""
        return self.sealed and self.pending == 0


class OutputSink:
    """Produces output records and tells which input offsets may be committed."""

    def __init__(self, producer_config: dict[str, str | int | float | bool]) -> None:
        self.producer = Producer({**PRODUCER_DEFAULTS, **producer_config})
        self._inflight: deque[InflightBatch] = deque()

    def produce(
        self, batch: InflightBatch, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        """Queue one record of a batch; waits for room when librdkafka's queue is full."""
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=batch.on_delivery)
                batch.pending += 1
                return
            except BufferError:
                self.producer.poll(0.05)

    def seal(self, batch: InflightBatch) -> None:
        """No more records will be added to the batch."""
        batch.sealed = True
        self._inflight.append(batch)
        self.producer.poll(0)

    @property
    def inflight(self) -> int:
        """Batches produced but not yet fully acknowledged."""
        return len(self._inflight)

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports."""
        self.producer.poll(timeout)

    def releasable(self) -> list[TopicPartition]:
        """Offsets to commit: those of the acknowledged prefix of batches; raises on a failed delivery."""
        merged: dict[tuple[str, int], int] = {}
        while self._inflight and self._inflight[0].done:
            batch = self._inflight.popleft()
            if batch.error is not None:
                raise DeliveryError(f"output not acknowledged, input offsets stay uncommitted: {batch.error}")
            for tp, offset in batch.next_offsets.items():
                merged[tp] = max(offset, merged.get(tp, -1))
        return [TopicPartition(topic, partition, offset) for (topic, partition), offset in merged.items()]

    def flush(self, timeout: float) -> list[TopicPartition]:
        """Wait for every in-flight record and return the offsets that may now be committed."""
        remaining = self.producer.flush(timeout)
        if remaining:
            log.warning("%d output records still unacknowledged after %.1fs", remaining, timeout)
        return self.releasable()
