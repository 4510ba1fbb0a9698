"""Output sink: the idempotent producer, delivery tracking and in-order offset commits.

An input offset is committed only after every record produced for its batch (predictions and
dead letters alike) was acknowledged by the broker. Batches are acknowledged out of order across
partitions, so the tracker commits the longest prefix of fully acknowledged batches.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from streamserve.errors import DeliveryError, Fenced, TransactionAborted
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
        self.transactional = "transactional.id" in producer_config
        self._inflight: deque[InflightBatch] = deque()

    # Exactly-once: one transaction per micro-batch holds its outputs and its input offsets.

    def init_transactions(self, timeout_s: float) -> None:
        """Register the transactional.id with the coordinator, fencing any older producer that had it."""
        self.producer.init_transactions(timeout_s)

    def begin(self) -> None:
        """Open the micro-batch's transaction."""
        try:
            self.producer.begin_transaction()
        except KafkaException as exc:
            raise Fenced(f"cannot begin a transaction: {exc.args[0]}") from exc

    def commit_transaction(self, offsets: list[TopicPartition], group_metadata: object, timeout_s: float) -> None:
        """Add the input offsets to the transaction and commit it; abort and raise TransactionAborted if the
        broker requires it (e.g. the partitions moved to another member); raise Fenced when fatal."""
        deadline = time.monotonic() + timeout_s
        offsets_sent = False
        while True:
            remaining = max(deadline - time.monotonic(), 1.0)
            try:
                if not offsets_sent:
                    self.producer.send_offsets_to_transaction(offsets, group_metadata, remaining)
                    offsets_sent = True
                self.producer.commit_transaction(remaining)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal():
                    raise Fenced(f"transactional producer failed fatally: {error}") from exc
                if error.txn_requires_abort():
                    log.warning("aborting the batch's transaction: %s", error)
                    self.abort(timeout_s)
                    raise TransactionAborted(str(error)) from exc
                if not error.retriable() or time.monotonic() > deadline:
                    self.abort(timeout_s)
                    raise TransactionAborted(f"commit did not complete: {error}") from exc
                log.info("retrying transaction commit: %s", error)

    def abort(self, timeout_s: float) -> None:
        """Abort the open transaction (its records become invisible to read_committed readers).

        Retried while the broker is unreachable: until the abort completes, nothing else may be produced.
        """
        deadline = time.monotonic() + max(timeout_s, 120.0)
        while True:
            try:
                self.producer.abort_transaction(timeout_s)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal():
                    raise Fenced(f"cannot abort: {error}") from exc
                if time.monotonic() > deadline:
                    raise DeliveryError(f"transaction could not be aborted: {error}") from exc
                log.warning("retrying abort_transaction: %s", error)

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
