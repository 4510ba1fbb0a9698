"""Delivery guarantees: how a micro-batch's outputs and its input offsets become durable.

``AtLeastOnce`` commits input offsets after every output of their batch was acknowledged; ``ExactlyOnce``
puts a batch's outputs and its input offsets in one Kafka transaction. Everything that differs between the
two - transactions, commits, rewinds, revocation, draining, producer replacement - lives here, so the worker
loop has no branch on the guarantee.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaException, TopicPartition

from streamserve.errors import ProducerFailed, TransactionAborted
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.sink import InflightBatch, OutputSink
from streamserve.pipeline.source import KafkaSource
from streamserve.records import Rejected, Source

log = logging.getLogger(__name__)

MAX_PRODUCER_RESTARTS = 10
"""Fatal producer errors tolerated within five minutes before the worker gives up."""

Emit = Callable[[list[Source], InflightBatch, OutputSink], list[Rejected]]
"""Runs a batch and produces its outputs and dead letters to the sink; returns the rejected records."""
Process = Callable[[list[Source]], None]
"""The worker's whole handling of one batch (used when draining)."""
MakeSink = Callable[[dict[str, str | int | float | bool]], OutputSink]
"""Builds an output sink given the producer options the guarantee needs (a replacement reuses it)."""


class DeliveryObserver(Protocol):
    """What the delivery tells the telemetry: when outputs are handed over and acknowledged, aborts, replacements."""

    def sealed(self, inflight: Any, sources: Sequence[Source]) -> None: ...
    def poll_acknowledged(self) -> None: ...
    def acknowledged(self, sources: Sequence[Source]) -> None: ...
    def transaction_aborted(self) -> None: ...
    def producer_replaced(self) -> None: ...


class _Unobserved:
    def sealed(self, inflight: Any, sources: Sequence[Source]) -> None:
        """Nothing to record."""

    def poll_acknowledged(self) -> None:
        """Nothing to record."""

    def acknowledged(self, sources: Sequence[Source]) -> None:
        """Nothing to record."""

    def transaction_aborted(self) -> None:
        """Nothing to record."""

    def producer_replaced(self) -> None:
        """Nothing to record."""


class Delivery(ABC):
    """The guarantee a worker gives: owns the output sink, decides when input offsets are committed."""

    name = ""

    def __init__(
        self,
        source: KafkaSource,
        batcher: MicroBatcher[Source],
        make_sink: MakeSink,
        timeout_s: float,
        transactional_id: str = "",
        transaction_timeout_ms: int = 60_000,
        observer: DeliveryObserver | None = None,
    ) -> None:
        self.source = source
        self.batcher = batcher
        self.transactional_id = transactional_id
        self.transaction_timeout_ms = transaction_timeout_ms
        self.make_sink = lambda: make_sink(self.producer_options())
        self.sink = self.make_sink()
        self.timeout_s = timeout_s
        self.aborted_batches = 0
        self.producer_restarts = 0
        self.telemetry: DeliveryObserver = observer or _Unobserved()

    def producer_options(self) -> dict[str, str | int | float | bool]:
        """What this guarantee adds to the producer's configuration."""
        return {}

    @property
    def inflight(self) -> int:
        """Batches handed to the producer whose outputs are not all acknowledged yet."""
        return self.sink.inflight

    def poll(self, timeout_s: float = 0) -> None:
        """Serve the producer's delivery reports (acknowledgements), waiting up to ``timeout_s`` for one."""
        self.sink.poll(timeout_s)

    @abstractmethod
    def start(self) -> None:
        """Before the first batch."""

    @abstractmethod
    def process(self, sources: list[Source], emit: Emit) -> list[Rejected] | None:
        """Run one batch through `emit` under the guarantee; None when it was abandoned to be read again."""

    @abstractmethod
    def commit(self) -> None:
        """Called every loop turn and while waiting for acknowledgements: commit what may be committed."""

    @abstractmethod
    def drain(self, process: Process, timeout_s: float) -> None:
        """On the way out: finish (or abandon) what is batched, make what was finished durable."""

    @abstractmethod
    def revoked(self, partitions: list[TopicPartition], process: Process) -> None:
        """The group takes partitions away: settle what we hold of them first."""

    def lost(self, partitions: list[TopicPartition]) -> None:
        """Partitions were lost (another member may own them): drop what we hold of them, commit nothing."""
        gone = {(p.topic, p.partition) for p in partitions}
        self.batcher.drop(lambda s: (s.topic, s.partition) not in gone)

    @abstractmethod
    def close(self) -> None:
        """After the loop, before the clients close."""


class AtLeastOnce(Delivery):
    """Input offsets are committed after every output of their batch was acknowledged (idempotent producer)."""

    name = "at_least_once"

    def start(self) -> None:
        """Nothing to register: the idempotent producer needs no coordinator."""

    def process(self, sources: list[Source], emit: Emit) -> list[Rejected] | None:
        inflight = InflightBatch()
        inflight.cover(sources)
        rejected = emit(sources, inflight, self.sink)
        self.sink.seal(inflight)
        self.telemetry.sealed(inflight, sources)
        return rejected

    def commit(self) -> None:
        self.telemetry.poll_acknowledged()
        self.source.release(self.sink.releasable())
        # Idle: whatever poll() handed out is processed and acknowledged, so its positions may be committed.
        self.source.commit(idle=not len(self.batcher) and not self.sink.inflight)

    def drain(self, process: Process, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.batcher) and time.monotonic() < deadline:
            process(self.batcher.take())
        self.source.release(self.sink.flush(max(deadline - time.monotonic(), 1.0)))
        # Also re-sends offsets whose earlier asynchronous commit failed (e.g. during a rebalance).
        self.source.commit(idle=not len(self.batcher) and not self.sink.inflight, asynchronous=False)

    def revoked(self, partitions: list[TopicPartition], process: Process) -> None:
        # Finish and commit what we hold before the partitions move, so the next owner starts after it.
        self.drain(process, self.timeout_s)

    def close(self) -> None:
        self.sink.producer.flush(5)


class ExactlyOnce(Delivery):
    """One Kafka transaction per micro-batch holds its outputs, its dead letters and its input offsets."""

    name = "exactly_once"

    def producer_options(self) -> dict[str, str | int | float | bool]:
        # Stable per worker: a restarted worker with the same id fences its zombie predecessor.
        return {"transactional.id": self.transactional_id, "transaction.timeout.ms": self.transaction_timeout_ms}

    def start(self) -> None:
        self.sink.init_transactions(self.timeout_s)

    def process(self, sources: list[Source], emit: Emit) -> list[Rejected] | None:
        try:
            self.sink.begin()
            inflight = InflightBatch()
            inflight.cover(sources)
            rejected = emit(sources, inflight, self.sink)
            offsets = [TopicPartition(t, p, o) for (t, p), o in inflight.next_offsets.items()]
            self.sink.commit_transaction(offsets, self.source.consumer.consumer_group_metadata(), self.timeout_s)
            self.telemetry.acknowledged(sources)
            return rejected
        except TransactionAborted:
            self.aborted_batches += 1
            self.telemetry.transaction_aborted()
            self._rewind(sources)
        except (ProducerFailed, KafkaException) as exc:
            if isinstance(exc, KafkaException) and not exc.args[0].fatal():
                raise
            self._replace_producer(exc, sources)
        return None

    def commit(self) -> None:
        """Offsets travel inside each batch's transaction."""

    def drain(self, process: Process, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.batcher) and time.monotonic() < deadline:
            process(self.batcher.take())
        self.batcher.drop(lambda _: False)  # past the deadline: abandoned uncommitted, the next owner re-reads it

    def revoked(self, partitions: list[TopicPartition], process: Process) -> None:
        # No transaction is open between batches; records not yet processed are left to the next owner.
        self.lost(partitions)

    def close(self) -> None:
        """Every batch was committed or aborted in its own transaction: nothing is left to flush."""

    def _replace_producer(self, cause: Exception, sources: list[Source]) -> None:
        """A fatal, non-fencing producer error: a new producer with the same transactional.id takes over
        (aborting whatever the old one left open) and the input is re-read from the committed offsets."""
        now = time.monotonic()
        self._failures = [t for t in getattr(self, "_failures", []) if now - t < 300] + [now]
        if len(self._failures) > MAX_PRODUCER_RESTARTS:
            raise ProducerFailed(f"{len(self._failures)} producer failures within 5 minutes, last: {cause}")
        log.warning("transactional producer failed (%s): replacing it, re-reading from committed offsets", cause)
        self.producer_restarts += 1
        self.telemetry.producer_replaced()
        self.sink = self.make_sink()
        self.sink.init_transactions(self.timeout_s)
        self._rewind(sources)

    def _rewind(self, sources: list[Source]) -> None:
        """After an aborted transaction: forget buffered records and read again from the aborted batch's start.

        Each batch commits its offsets in its own transaction, so the first record of the aborted batch (or
        of the buffered ones) in each partition is exactly the committed position; seeking there needs no
        round trip to a group coordinator that may be the reason the transaction failed.
        """
        start: dict[tuple[str, int], int] = {}
        for source in [*sources, *self.batcher.drop(lambda _: False)]:
            tp = (source.topic, source.partition)
            start[tp] = min(source.offset, start.get(tp, source.offset))
        self.source.seek(start)


def delivery_for(
    guarantee: str,
    source: KafkaSource,
    batcher: MicroBatcher[Source],
    make_sink: MakeSink,
    timeout_s: float,
    transactional_id: str = "",
    transaction_timeout_ms: int = 60_000,
    observer: DeliveryObserver | None = None,
) -> Delivery:
    """The strategy a pipeline's ``delivery`` setting names."""
    kinds: dict[str, type[Delivery]] = {AtLeastOnce.name: AtLeastOnce, ExactlyOnce.name: ExactlyOnce}
    kind = kinds[guarantee]
    return kind(source, batcher, make_sink, timeout_s, transactional_id, transaction_timeout_ms, observer)
