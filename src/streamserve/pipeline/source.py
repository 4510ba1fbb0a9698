"""Input source: a consumer-group member reading the input topic in micro-batch sized polls.

At-least-once commits go through a CommitTracker: per owned partition it keeps the offset the worker
wants committed and the last one the broker confirmed, and re-sends the difference until it is confirmed.
An asynchronous commit racing a rebalance fails (REBALANCE_IN_PROGRESS, ILLEGAL_GENERATION...); sending
each offset once would leave a partition that then goes idle uncommitted for good, and its records would be
predicted again by whoever reads it next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from streamserve.observe.kafkalog import TransientAtStart
from streamserve.records import Source

log = logging.getLogger(__name__)
log.addFilter(TransientAtStart())  # the broker's start-up answers ("Coordinator load in progress") while they pass

CONSUMER_DEFAULTS: dict[str, str | int | float | bool] = {
    "enable.auto.commit": False,  # offsets are committed after outputs are acknowledged
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 10_000,
    "fetch.wait.max.ms": 10,
    # The broker answers a fetch as soon as it has one byte: under steady load the consumer then fetches back to
    # back, a few records a request. 64 KiB lets it hold a fetch until it has that much or fetch.wait.max.ms passed
    # (at most that much more latency; a backlog fills it at once). One worker at 25,000 events/s: librdkafka's
    # threads 0.11 -> 0.06-0.07 cores, the broker 0.50-0.53 -> 0.42-0.44 (python -m bench.rate_cost --rate N
    # --set 'kafka.consumer={"fetch.min.bytes": 1}').
    "fetch.min.bytes": 65_536,
    "isolation.level": "read_committed",  # never score records of an upstream transaction that aborted
    "queued.max.messages.kbytes": 16_384,  # bounds prefetched input: memory stays flat when we pause
    # librdkafka can keep a stale or unknown partition leader after a broker restart until the next periodic
    # metadata refresh (5 min by default; librdkafka #4976, #3396): a worker then holds its partitions idle.
    "topic.metadata.refresh.interval.ms": 10_000,
}

COMMIT_INTERVAL_S = 1.0
"""At-least-once: how often offsets not yet confirmed by the broker are committed again (and, when the
worker is idle, how often its consumed positions are committed); an idle group's committed offsets reach
the end offsets within about this long."""

RevokeCallback = Callable[[list[TopicPartition]], None]
Partition = tuple[str, int]


class CommitTracker:
    """Which input offsets are still to be committed, per owned partition (pure bookkeeping, no I/O).

    An offset is wanted once everything before it was processed and acknowledged; it is pending until the
    broker confirms a commit of it. Only owned partitions are tracked, and their state is dropped on revoke
    or loss. Offsets released for a partition before its first record since the assignment was read (late
    acknowledgements of a previous ownership) are ignored: committing them could move the group backwards.
    """

    def __init__(self, interval_s: float = COMMIT_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._owned: set[Partition] = set()
        self._first_read: dict[Partition, int] = {}
        self._wanted: dict[Partition, int] = {}
        self._confirmed: dict[Partition, int] = {}
        self._fresh = False
        self._next_retry = 0.0
        self.unread: set[Partition] = set()
        """Owned partitions no record was read from since their assignment."""

    def assign(self, partitions: Iterable[Partition]) -> None:
        """Partitions added to this member's assignment."""
        for tp in partitions:
            self._owned.add(tp)
            self.unread.add(tp)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Partitions revoked or lost: nothing more is committed for them."""
        for tp in partitions:
            self._owned.discard(tp)
            self.unread.discard(tp)
            self._first_read.pop(tp, None)
            self._wanted.pop(tp, None)
            self._confirmed.pop(tp, None)

    def read(self, tp: Partition, offset: int) -> None:
        """A record was handed to the worker (only the first one per assignment matters)."""
        if tp in self.unread:
            self.unread.discard(tp)
            self._first_read[tp] = offset

    def release(self, offsets: Iterable[tuple[Partition, int]]) -> None:
        """Every record before these offsets was processed and its outputs acknowledged."""
        for tp, offset in offsets:
            first = self._first_read.get(tp)
            if first is None or offset <= first or tp not in self._owned:
                continue
            if offset > self._wanted.get(tp, -1):
                self._wanted[tp] = offset
                self._fresh = True

    def release_positions(self, positions: Iterable[tuple[Partition, int]]) -> None:
        """Consumed positions of an idle worker (everything handed to it is done); may pass control records."""
        for tp, offset in positions:
            if tp in self._owned and offset >= 0 and offset > self._wanted.get(tp, -1):
                self._wanted[tp] = offset
                self._fresh = True

    def pending(self) -> dict[Partition, int]:
        """Wanted offsets the broker has not confirmed yet."""
        return {tp: offset for tp, offset in self._wanted.items() if offset > self._confirmed.get(tp, -1)}

    def due(self) -> dict[Partition, int]:
        """Pending offsets to send now: at once when new ones were released, else once per interval."""
        pending = self.pending()
        now = self._clock()
        if not pending or not (self._fresh or now >= self._next_retry):
            return {}
        self._fresh = False
        self._next_retry = now + self.interval_s
        return pending

    def confirmed(self, offsets: Iterable[tuple[Partition, int]]) -> None:
        """The broker stored these offsets."""
        for tp, offset in offsets:
            if tp in self._owned and offset > self._confirmed.get(tp, -1):
                self._confirmed[tp] = offset


class KafkaSource:
    """Subscribes to the input topic; on revoke, lets the worker finish and commit first."""

    def __init__(
        self,
        consumer_config: dict[str, str | int | float | bool],
        topic: str,
        commit_interval_s: float = COMMIT_INTERVAL_S,
    ) -> None:
        self.consumer = Consumer({**CONSUMER_DEFAULTS, **consumer_config, "on_commit": self._committed})
        self.topic = topic
        self.assignment: set[tuple[str, int]] = set()
        self.joined = False
        """Set once the group has answered with a first assignment (readiness)."""
        self.offsets = CommitTracker(commit_interval_s)
        self._on_revoke: RevokeCallback | None = None
        self._on_lost: RevokeCallback | None = None
        self._consuming = False
        self._next_position_check = 0.0
        self._failed_commits = 0

    def start(self, on_revoke: RevokeCallback, on_lost: RevokeCallback | None = None) -> None:
        """Join the group."""
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self.consumer.subscribe([self.topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assignment.update((tp.topic, tp.partition) for tp in partitions)
        self.offsets.assign((tp.topic, tp.partition) for tp in partitions)
        self.joined = True
        log.info("assigned %s", sorted(tp.partition for tp in partitions))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoking %s", sorted(tp.partition for tp in partitions))
        if self._on_revoke is not None:
            self._on_revoke(partitions)
        self.assignment.difference_update((tp.topic, tp.partition) for tp in partitions)
        self.offsets.forget((tp.topic, tp.partition) for tp in partitions)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost partitions may already belong to another member: nothing of theirs may be committed.
        log.warning("lost %s", sorted(tp.partition for tp in partitions))
        self.assignment.difference_update((tp.topic, tp.partition) for tp in partitions)
        self.offsets.forget((tp.topic, tp.partition) for tp in partitions)
        if self._on_lost is not None:
            self._on_lost(partitions)

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """Result of a commit (served from poll): confirmed offsets stop being re-sent, failed ones are retried."""
        failed = [tp for tp in partitions if err is not None or tp.error is not None]
        self.offsets.confirmed(
            ((tp.topic, tp.partition), tp.offset) for tp in partitions if err is None and tp.error is None
        )
        if failed and not self._failed_commits:  # once per streak: a rebalance fails every commit for seconds
            log.info(
                "commit of %s not confirmed (%s): retrying every %.1fs until it is",
                [(tp.partition, tp.offset) for tp in failed],
                err if err is not None else failed[0].error,
                self.offsets.interval_s,
            )
        if failed:
            self._failed_commits += 1
        elif self._failed_commits:
            log.info("commits confirmed again after %d failed ones", self._failed_commits)
            self._failed_commits = 0

    def poll(self, max_records: int, timeout: float) -> list[Source]:
        """Up to max_records input records, waiting at most timeout seconds."""
        if max_records <= 0:
            return []
        # Rebalance callbacks run inside consume(), possibly after it took records not yet handed out: the
        # consumed position is no proof of processing there.
        self._consuming = True
        try:
            messages: list[Message] = self.consumer.consume(num_messages=max_records, timeout=timeout)
        finally:
            self._consuming = False
        sources: list[Source] = []
        append = sources.append
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            # no typing.cast() here: a real call per field and record, on the hottest loop
            append(Source(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(), msg.headers(),  # type: ignore[arg-type]
                          msg.timestamp()[1]))  # fmt: skip
        if self.offsets.unread:
            for source in sources:
                self.offsets.read((source.topic, source.partition), source.offset)
        return sources

    def release(self, offsets: list[TopicPartition]) -> None:
        """Every record before these offsets was processed and acknowledged: they may be committed."""
        self.offsets.release(((tp.topic, tp.partition), tp.offset) for tp in offsets)

    def commit(self, idle: bool = False, asynchronous: bool = True) -> None:
        """Commit the released offsets the broker has not confirmed yet, for partitions this member owns.

        Asynchronous commits go out when new offsets were released, and again every commit interval until
        confirmed. idle=True says everything handed out by poll() is done: the consumed positions are then
        committed too (they also pass transaction markers, which no record releases). A synchronous commit
        (revoke, shutdown) sends every pending offset at once and waits for the broker's answer.
        """
        if idle and not self._consuming and (not asynchronous or time.monotonic() >= self._next_position_check):
            self._next_position_check = time.monotonic() + self.offsets.interval_s
            self.offsets.release_positions(self._positions())
        offsets = self.offsets.due() if asynchronous else self.offsets.pending()
        owned = [TopicPartition(t, p, o) for (t, p), o in offsets.items() if (t, p) in self.assignment]
        if not owned:
            return
        try:
            if asynchronous:
                self.consumer.commit(offsets=owned, asynchronous=True)
                return
            result = self.consumer.commit(offsets=owned, asynchronous=False) or []
        except KafkaException as exc:
            # Racing a rebalance: retried next interval; if the partition moves, its next owner re-reads it.
            log.warning("commit of %s failed: %s", [(tp.partition, tp.offset) for tp in owned], exc)
            return
        self._committed(None, result)

    def _positions(self) -> list[tuple[Partition, int]]:
        try:
            positions = self.consumer.position(self._assigned_partitions())
        except KafkaException as exc:
            log.warning("reading consumed positions failed: %s", exc)
            return []
        return [((tp.topic, tp.partition), tp.offset) for tp in positions if tp.error is None]

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
