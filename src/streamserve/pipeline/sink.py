"""Output sink: the idempotent producer, record size checks, delivery tracking and in-order offset commits.

Every record's size is checked against the producer's and its topic's limit (pipeline/limits.py: read at start,
passed in) before it is produced, so a size error never comes back asynchronously in a delivery report (under
exactly-once that would abort the batch's transaction, and the batch would be re-read and fail again, forever).

An input offset is committed only after every record produced for its batch (predictions and
dead letters alike) was acknowledged by the broker. Batches are acknowledged out of order across
partitions, so the tracker commits the longest prefix of fully acknowledged batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from streamserve.errors import DeliveryError, Fenced, ProducerFailed, RecordTooLarge, TransactionAborted
from streamserve.pipeline.limits import DEFAULT_MESSAGE_MAX_BYTES, SizeLimits, record_size
from streamserve.records import Headers, Source, highest_offsets

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, str | int | float | bool] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",  # same partition for a key as the Java client
    "queue.buffering.max.messages": 200_000,
    "topic.metadata.refresh.interval.ms": 10_000,  # bounds a stale leader after a broker restart (see source.py)
}


ABORT_STEP_S = 10.0
ABORT_ATTEMPTS = 3
"""An abort retried this many times (of ABORT_STEP_S each) without completing: the producer is replaced."""
SEND_OFFSETS_TIMEOUT_S = 10.0
"""It takes milliseconds when the coordinator is up; past this (+5 s) the producer counts as stuck."""

FENCING_CODES = {
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


def fatal_error(error: KafkaError) -> Fenced | ProducerFailed:
    """Fencing means another instance took over (stop); anything else fatal means start a new producer.

    A bare _FATAL (its cause not reported) counts as fencing: replacing the producer would fence the instance
    that most likely took over, and the two would fight for the transactional.id.
    """
    if error.code() in FENCING_CODES or error.code() == KafkaError._FATAL:
        return Fenced(f"another producer took over this worker's transactional.id: {error}")
    return ProducerFailed(str(error))


def _bounded(call: Callable[..., object], timeout_s: float, *args: object) -> None:
    """Run a blocking librdkafka call in a helper thread and give up on it after timeout_s (plus slack).

    send_offsets_to_transaction() can block forever when the group coordinator goes away, whatever its
    timeout (librdkafka issues #5456 and #5511). A producer stuck in it is treated as failed: the worker
    replaces it, and the new producer's init_transactions() fences the stuck one.
    """
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call(*args)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed over to the calling thread below
            outcome.append(exc)

    thread = threading.Thread(target=target, name=f"streamserve-{getattr(call, '__name__', 'call')}", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if not outcome:
        raise ProducerFailed(f"{getattr(call, '__name__', call)} did not return within {timeout_s + 5:.0f}s")
    if outcome[0] is not None:
        raise outcome[0]


@dataclass(slots=True)
class InflightBatch:
    """Records of one micro-batch awaiting acknowledgement, and the input offsets they release."""

    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    pending: int = 0
    sealed: bool = False
    error: str | None = None

    def cover(self, sources: Sequence[Source]) -> None:
        """Record the input positions this batch releases once acknowledged."""
        for tp, offset in highest_offsets(sources).items():
            if offset + 1 > self.next_offsets.get(tp, -1):
                self.next_offsets[tp] = offset + 1

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

    def __init__(self, producer_config: dict[str, str | int | float | bool], limits: SizeLimits | None = None) -> None:
        config: dict[str, Any] = {**PRODUCER_DEFAULTS, **producer_config}
        self.limits = limits or SizeLimits(int(config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)))
        # librdkafka fills a batch up to batch.size whatever the topic takes: keep it under every topic's limit.
        batch_size = int(config.get("batch.size", DEFAULT_MESSAGE_MAX_BYTES))
        config["batch.size"] = min(batch_size, self.limits.max_batch_bytes)
        self.fatal: KafkaError | None = None
        """The producer's fatal error as librdkafka reported it (produce() itself only says _FATAL)."""
        user_error_cb = config.pop("error_cb", None)

        def on_error(error: KafkaError) -> None:
            if error.fatal():
                self.fatal = error
            if callable(user_error_cb):
                user_error_cb(error)
            elif not error.fatal():
                log.warning("producer: %s", error)

        config["error_cb"] = on_error
        self.producer = Producer(config)
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
            raise fatal_error(exc.args[0]) from exc

    def commit_transaction(self, offsets: list[TopicPartition], group_metadata: object, timeout_s: float) -> None:
        """Add the input offsets to the transaction and commit it.

        Retriable errors (a broker restarting) are retried - never answered with an abort, since the commit
        may already be under way; the coordinator's transaction.timeout.ms bounds the wait. When the broker
        requires it (e.g. the partitions moved to another member) the transaction is aborted and
        TransactionAborted raised. Fatal errors raise Fenced or ProducerFailed.
        """
        offsets_sent = False
        while True:
            try:
                if not offsets_sent:
                    step_s = min(timeout_s, SEND_OFFSETS_TIMEOUT_S)
                    _bounded(self.producer.send_offsets_to_transaction, step_s, offsets, group_metadata, step_s)
                    offsets_sent = True
                self.producer.commit_transaction(timeout_s)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal():
                    raise fatal_error(error) from exc
                if error.txn_requires_abort():
                    log.warning("aborting the batch's transaction: %s", error)
                    self.abort(timeout_s)
                    raise TransactionAborted(str(error)) from exc
                if not error.retriable():
                    self.abort(timeout_s)
                    raise TransactionAborted(f"commit failed: {error}") from exc
                log.warning("transaction commit not confirmed yet, retrying: %s", error)
                time.sleep(0.2)

    def abort(self, timeout_s: float) -> None:
        """Abort the open transaction (its records become invisible to read_committed readers).

        Retried a few times while the broker is unreachable; an abort that still does not complete (seen after a
        broker restart: the coordinator never answers this producer again) makes the producer count as failed:
        the worker replaces it, and the new producer's init_transactions() aborts what this one left open.
        """
        step_s = min(timeout_s, ABORT_STEP_S)
        for attempt in range(1, ABORT_ATTEMPTS + 1):
            try:
                self.producer.abort_transaction(step_s)
                return
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                if error.fatal() or not error.retriable():
                    raise fatal_error(error) from exc
                log.warning("retrying abort_transaction (%d of %d): %s", attempt, ABORT_ATTEMPTS, error)
                time.sleep(0.2)
        raise ProducerFailed(f"abort_transaction did not complete in {ABORT_ATTEMPTS} attempts of {step_s:.0f}s")

    def max_record_bytes(self, topic: str) -> int:
        """The largest record `topic` takes from this producer (pass it to dead_letter())."""
        return self.limits.max_record_bytes(topic)

    def fits(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None) -> bool:
        """The record can be produced to `topic`: produce() will not raise RecordTooLarge for it."""
        return record_size(key, value, headers) <= self.limits.max_record_bytes(topic)

    def produce(
        self, batch: InflightBatch, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None
    ) -> None:
        """Queue one record of a batch; waits for room when librdkafka's queue is full.

        Raises RecordTooLarge (nothing queued, the batch unchanged) for a record over the size limit: the
        caller routes the input it came from to the dead-letter topic.
        """
        size = record_size(key, value, headers)
        limit = self.limits.max_record_bytes(topic)
        if size > limit:
            raise RecordTooLarge(topic, size, limit)
        self._queue(batch, topic, key, value, headers, size, limit)

    def _queue(
        self,
        batch: InflightBatch,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
        size: int,
        limit: int,
    ) -> None:
        """Queue a record whose size was checked, waiting for room when librdkafka's queue is full; RecordTooLarge
        when librdkafka refuses its size all the same."""
        while True:
            try:
                self.producer.produce(topic, value, key, headers=headers, on_delivery=batch.on_delivery)
                batch.pending += 1
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError._FATAL or exc.args[0].fatal():
                    self.producer.poll(0)  # serves the error callback, which names the cause (e.g. fencing)
                    raise fatal_error(self.fatal or exc.args[0]) from exc
                if exc.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    raise RecordTooLarge(topic, size, limit) from exc
                raise

    def produce_all(
        self,
        batch: InflightBatch,
        topic: str,
        keys: Sequence[bytes | None],
        values: Sequence[bytes],
        headers: Sequence[Headers | None],
    ) -> list[tuple[int, RecordTooLarge]]:
        """produce() of many records to one topic, in order; the positions of those over the size limit come
        back with their error (nothing queued for them). What is the same for the batch (the topic's limit, the
        size of a shared header list) is worked out once."""
        limit = self.limits.max_record_bytes(topic)
        framing: dict[int, int] = {}  # id of a header list -> its size plus the record's framing
        too_large: list[tuple[int, RecordTooLarge]] = []
        produce, on_delivery = self.producer.produce, batch.on_delivery
        for position, (key, value, record_headers) in enumerate(zip(keys, values, headers, strict=True)):
            fixed = framing.get(id(record_headers))
            if fixed is None:
                fixed = framing[id(record_headers)] = record_size(None, None, record_headers)
            size = fixed + len(key or b"") + len(value)
            if size > limit:
                too_large.append((position, RecordTooLarge(topic, size, limit)))
                continue
            try:
                produce(topic, value, key, headers=record_headers, on_delivery=on_delivery)
                batch.pending += 1
            except (BufferError, KafkaException):  # a full queue or an error: the one-record path handles it
                try:
                    self._queue(batch, topic, key, value, record_headers, size, limit)
                except RecordTooLarge as exc:
                    too_large.append((position, exc))
        return too_large

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
