"""Both delivery strategies without servers: what each commits, when, and what it re-reads after a failure.

The source and the sink are recording fakes with the interface the strategies use (KafkaSource, OutputSink);
the behaviour under a real broker is covered by the integration and fault suites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from streamserve.errors import ProducerFailed, TransactionAborted
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.delivery import MAX_PRODUCER_RESTARTS, AtLeastOnce, ExactlyOnce, delivery_for
from streamserve.pipeline.sink import InflightBatch
from streamserve.records import Rejected, Source, offset_bounds


def src(partition: int, offset: int, topic: str = "in") -> Source:
    return Source(topic, partition, offset, None, b"x", None, 0)


@dataclass
class FakeConsumer:
    def consumer_group_metadata(self) -> str:
        return "group-metadata"


@dataclass
class FakeSource:
    released: list[tuple[str, int, int]] = field(default_factory=list)
    commits: list[tuple[bool, bool]] = field(default_factory=list)
    seeks: list[dict[tuple[str, int], int]] = field(default_factory=list)
    consumer: FakeConsumer = field(default_factory=FakeConsumer)

    def release(self, offsets: list[TopicPartition]) -> None:
        self.released += [(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def commit(self, idle: bool = False, asynchronous: bool = True) -> None:
        self.commits.append((idle, asynchronous))

    def seek(self, positions: dict[tuple[str, int], int]) -> None:
        self.seeks.append(dict(positions))


class FakeProducer:
    def flush(self, timeout: float) -> int:
        return 0


@dataclass
class FakeSink:
    """Acknowledges a sealed batch when told to (ack()); transactions are recorded, failures injected."""

    options: dict[str, Any]
    sealed: list[InflightBatch] = field(default_factory=list)
    transactions: list[list[tuple[str, int, int]]] = field(default_factory=list)
    began: int = 0
    initialized: int = 0
    fail_commit: Exception | None = None
    producer: FakeProducer = field(default_factory=FakeProducer)

    def init_transactions(self, timeout_s: float) -> None:
        self.initialized += 1

    def begin(self) -> None:
        self.began += 1

    def commit_transaction(self, offsets: list[TopicPartition], metadata: object, timeout_s: float) -> None:
        assert metadata == "group-metadata"
        if self.fail_commit is not None:
            raise self.fail_commit
        self.transactions.append(sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))

    def seal(self, batch: InflightBatch) -> None:
        batch.sealed = True
        self.sealed.append(batch)

    def ack(self) -> None:
        for batch in self.sealed:
            batch.pending = 0

    @property
    def inflight(self) -> int:
        return sum(1 for batch in self.sealed if not batch.done)

    def releasable(self) -> list[TopicPartition]:
        done = []
        while self.sealed and self.sealed[0].done:
            done.append(self.sealed.pop(0))
        return [TopicPartition(t, p, o) for batch in done for (t, p), o in batch.next_offsets.items()]

    def flush(self, timeout: float) -> list[TopicPartition]:
        self.ack()
        return self.releasable()


def make(kind: str) -> tuple[Any, FakeSource, MicroBatcher[Source], list[FakeSink]]:
    source, batcher, sinks = FakeSource(), MicroBatcher[Source](4, 10), []

    def make_sink(options: dict[str, Any]) -> FakeSink:
        sinks.append(FakeSink(options))
        return sinks[-1]

    delivery = delivery_for(kind, source, batcher, make_sink, 5.0, "group-worker-1", 30_000)  # type: ignore[arg-type]
    return delivery, source, batcher, sinks


def emit_pending(sources: list[Source], inflight: InflightBatch, sink: Any) -> list[Rejected]:
    """Produces one output per source (acknowledged later) and rejects odd offsets."""
    inflight.pending += len(sources)
    return [Rejected(s, "decode", "DecodeError", "odd") for s in sources if s.offset % 2]


# --- at least once -----------------------------------------------------------------------------------------


def test_at_least_once_commits_only_after_the_outputs_are_acknowledged() -> None:
    delivery, source, _, sinks = make("at_least_once")
    assert isinstance(delivery, AtLeastOnce)
    assert sinks[0].options == {}, "no transactional producer"
    rejected = delivery.process([src(0, 10), src(0, 11), src(1, 5)], emit_pending)
    assert [r.source.offset for r in rejected or []] == [11, 5]
    delivery.commit()
    assert source.released == [], "nothing acknowledged yet"
    assert source.commits[-1] == (False, True), "not idle while a batch is in flight"
    sinks[0].ack()
    delivery.commit()
    assert sorted(source.released) == [("in", 0, 12), ("in", 1, 6)]
    assert source.commits[-1] == (True, True)


def test_at_least_once_commits_batches_in_order_only() -> None:
    delivery, source, _, sinks = make("at_least_once")
    delivery.process([src(0, 0)], emit_pending)
    delivery.process([src(0, 1)], emit_pending)
    sinks[0].sealed[1].pending = 0  # the second batch acknowledged before the first
    delivery.commit()
    assert source.released == [], "a later batch's offset never passes an unacknowledged earlier one"
    sinks[0].sealed[0].pending = 0
    delivery.commit()
    assert source.released == [("in", 0, 1), ("in", 0, 2)]


def test_at_least_once_drain_processes_what_is_batched_and_commits_synchronously() -> None:
    delivery, source, batcher, _ = make("at_least_once")
    batcher.add([src(0, 0), src(0, 1), src(2, 7)])
    processed: list[list[Source]] = []

    def process(sources: list[Source]) -> None:
        processed.append(sources)
        delivery.process(sources, emit_pending)

    delivery.revoked([TopicPartition("in", 0)], process)
    assert [[s.offset for s in batch] for batch in processed] == [[0, 1, 7]]
    assert sorted(source.released) == [("in", 0, 2), ("in", 2, 8)]
    assert source.commits[-1] == (True, False)
    assert not len(batcher)


def test_lost_partitions_drop_their_buffered_records_without_committing() -> None:
    delivery, source, batcher, _ = make("at_least_once")
    batcher.add([src(0, 0), src(1, 0), src(0, 1)])
    delivery.lost([TopicPartition("in", 0)])
    assert [(s.partition, s.offset) for s in batcher.take()] == [(1, 0)]
    assert source.released == []
    assert source.commits == []


# --- exactly once ------------------------------------------------------------------------------------------


def test_exactly_once_puts_each_batchs_offsets_in_its_transaction() -> None:
    delivery, source, _, sinks = make("exactly_once")
    assert isinstance(delivery, ExactlyOnce)
    assert sinks[0].options == {"transactional.id": "group-worker-1", "transaction.timeout.ms": 30_000}
    delivery.start()
    assert sinks[0].initialized == 1
    rejected = delivery.process([src(0, 4), src(0, 5), src(3, 9)], emit_pending)
    assert [r.source.offset for r in rejected or []] == [5, 9]
    assert sinks[0].began == 1
    assert sinks[0].transactions == [[("in", 0, 6), ("in", 3, 10)]]
    delivery.commit()
    assert source.released == [], "offsets travel only inside transactions"
    assert source.commits == []


def test_an_aborted_transaction_rewinds_to_the_batch_and_forgets_what_was_buffered() -> None:
    delivery, source, batcher, sinks = make("exactly_once")
    batcher.add([src(0, 8), src(1, 2)])  # read after the batch, not processed yet
    sinks[0].fail_commit = TransactionAborted("partitions moved")
    assert delivery.process([src(0, 5), src(0, 6), src(1, 1)], emit_pending) is None
    assert delivery.aborted_batches == 1
    assert source.seeks == [{("in", 0): 5, ("in", 1): 1}]
    assert not len(batcher), "buffered records are read again after the seek"
    assert len(sinks) == 1, "an abort keeps the producer"


def test_a_failed_producer_is_replaced_with_the_same_transactional_id_and_the_batch_read_again() -> None:
    delivery, source, _, sinks = make("exactly_once")
    sinks[0].fail_commit = ProducerFailed("stuck")
    assert delivery.process([src(2, 40)], emit_pending) is None
    assert len(sinks) == 2
    assert delivery.sink is sinks[1]
    assert sinks[1].options["transactional.id"] == "group-worker-1", "fences what the old producer left open"
    assert sinks[1].initialized == 1
    assert source.seeks == [{("in", 2): 40}]
    assert delivery.producer_restarts == 1
    assert delivery.process([src(2, 40)], emit_pending) == []
    assert sinks[1].transactions == [[("in", 2, 41)]]


def test_a_producer_that_keeps_failing_stops_the_worker() -> None:
    delivery, _, _, sinks = make("exactly_once")
    for _ in range(MAX_PRODUCER_RESTARTS):
        sinks[-1].fail_commit = ProducerFailed("stuck")
        delivery.process([src(0, 0)], emit_pending)
    sinks[-1].fail_commit = ProducerFailed("stuck")
    with pytest.raises(ProducerFailed, match="producer failures within 5 minutes"):
        delivery.process([src(0, 0)], emit_pending)
    assert delivery.producer_restarts == MAX_PRODUCER_RESTARTS


def test_exactly_once_revocation_leaves_unprocessed_records_to_the_next_owner() -> None:
    delivery, source, batcher, sinks = make("exactly_once")
    batcher.add([src(0, 1), src(1, 1)])
    delivery.revoked([TopicPartition("in", 1)], lambda sources: pytest.fail("nothing is processed on revoke"))
    assert [(s.partition, s.offset) for s in batcher.take()] == [(0, 1)]
    assert sinks[0].transactions == []
    assert source.seeks == []


def test_exactly_once_drain_commits_what_is_batched() -> None:
    delivery, _, batcher, sinks = make("exactly_once")
    batcher.add([src(0, 1), src(0, 2)])
    delivery.drain(lambda sources: delivery.process(sources, emit_pending), 5.0)
    assert sinks[0].transactions == [[("in", 0, 3)]]
    assert not len(batcher)


def test_exactly_once_drain_past_its_deadline_abandons_everything_held() -> None:
    delivery, _, _, sinks = make("exactly_once")
    batcher = delivery.batcher = MicroBatcher[Source](4, 10, ahead=1)  # a batch held ahead as well
    batcher.add([src(0, offset) for offset in range(8)])
    delivery.drain(lambda sources: delivery.process(sources, emit_pending), 0.0)
    assert not sinks[0].transactions, "nothing processed past the deadline"
    assert not len(batcher), "both batches held are abandoned to the next owner, none left behind"


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 2), st.integers(0, 10**12)), max_size=40))
def test_offset_bounds_are_each_partitions_lowest_and_highest(records: list[tuple[str, int, int]]) -> None:
    """A batch's offsets per (topic, partition), whatever their order: what commits and log context rely on."""
    sources = [Source(topic, partition, offset, None, b"", None, 0) for topic, partition, offset in records]
    lowest, highest = offset_bounds(sources)
    partitions = {(topic, partition) for topic, partition, _ in records}
    assert lowest == {tp: min(o for t, p, o in records if (t, p) == tp) for tp in partitions}
    assert highest == {tp: max(o for t, p, o in records if (t, p) == tp) for tp in partitions}
    batch = InflightBatch()
    batch.cover(sources)
    assert batch.next_offsets == {tp: offset + 1 for tp, offset in highest.items()}
