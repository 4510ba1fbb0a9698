"""`streamserve dlq inspect|replay` against Kafka: the DLQ topic read outside any group, the replay ledger, the
transactions (the rules themselves: ops/deadletters.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from confluent_kafka import Producer

from streamserve.config import PipelineSettings
from streamserve.errors import ConfigError
from streamserve.ops.admin import TopicSpec, ensure_topics
from streamserve.ops.deadletters import (
    DeadLetter,
    OutputRecord,
    Replayer,
    ReplayOutcome,
    ReplayPlan,
    Selection,
    parse_dead_letter,
    plan,
    replay,
    to_topic,
)
from streamserve.ops.history import Position, read_range, reader, resolve_range
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.routing import Routing
from streamserve.records import Headers, Source

log = logging.getLogger(__name__)

LibrdkafkaConfig = dict[str, str | int | float | bool]
LEDGER_SUFFIX = ".replayed"
LEDGER_CONFIG = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "600000"}


def ledger_topic(settings: PipelineSettings) -> str:
    """The replay ledger of the pipeline's DLQ topic: ``<dead_letter_topic>.replayed``, compacted."""
    return settings.output.dead_letter_topic + LEDGER_SUFFIX


def transactional_id(settings: PipelineSettings) -> str:
    """One per DLQ topic: a new replay fences a running one and aborts what a killed one left open."""
    return f"streamserve-dlq-replay-{settings.output.dead_letter_topic}"


class KafkaTransactions:
    """A transactional producer as replay's TransactionalWriter."""

    def __init__(self, config: LibrdkafkaConfig, transactional_id: str, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self.producer = Producer(
            {**config, "transactional.id": transactional_id, "enable.idempotence": True, "linger.ms": 20}
        )
        # Fences an earlier replay of the same DLQ and aborts the transaction it left open (a kill mid-way).
        self.producer.init_transactions(timeout_s)

    def begin(self) -> None:
        """Open a transaction."""
        self.producer.begin_transaction()

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None, partition: int | None = None
    ) -> None:
        """Write one record inside the open transaction (to `partition`, when given)."""
        while True:
            try:
                if partition is None:
                    self.producer.produce(topic, value, key, headers=headers)
                else:
                    self.producer.produce(topic, value, key, partition=partition, headers=headers)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def commit(self) -> None:
        """Commit the open transaction."""
        self.producer.commit_transaction(self.timeout_s)

    def flush(self) -> None:
        """Send what is queued (the transaction stays open)."""
        self.producer.flush(self.timeout_s)


def read_dead_letters(
    config: LibrdkafkaConfig, topic: str, since: Position | None, timeout_s: float
) -> Iterator[DeadLetter]:
    """The DLQ topic's records (from `since`) as they are read, each parsed; foreign records are kept, marked not
    replayable. Streamed: inspecting a large DLQ holds its groups, not its records."""
    consumer = reader(config, "dlq")
    try:
        ranges = resolve_range(consumer, topic, since or Position(edge="beginning"), Position(edge="end"), timeout_s)
        read = 0
        for batch in read_range(consumer, topic, ranges, idle_timeout_s=timeout_s):
            yield from map(parse_dead_letter, batch)
            read += len(batch)
            log.debug("read %d of %d dead letters", read, sum(r.size for r in ranges))
    finally:
        consumer.close()


def read_ledger(config: LibrdkafkaConfig, topic: str, timeout_s: float) -> set[bytes]:
    """The keys of the dead letters replayed so far (committed transactions only); empty when no ledger yet."""
    consumer = reader(config, "ledger")
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            return set()
        ranges = resolve_range(consumer, topic, Position(edge="beginning"), Position(edge="end"), timeout_s)
        keys: set[bytes] = set()
        for batch in read_range(consumer, topic, ranges, idle_timeout_s=timeout_s):
            keys.update(record.key for record in batch if record.key is not None)
        return keys
    except TimeoutError as exc:
        raise ConfigError(
            f"the replay ledger {topic} cannot be read to its end: a replay is still running, or one killed less "
            f"than transaction.timeout.ms ago holds it ({exc})"
        ) from exc
    finally:
        consumer.close()


@dataclass(frozen=True)
class ReplayRequest:
    """What `streamserve dlq replay` was asked."""

    selection: Selection
    since: Position | None = None
    dry_run: bool = False
    score: bool = False
    per_transaction: int = 200
    rate: float | None = None
    timeout_s: float = 30.0


def run_replay(settings: PipelineSettings, request: ReplayRequest) -> tuple[ReplayPlan, ReplayOutcome | None]:
    """Plan the replay from the ledger and the DLQ; unless a dry run, write it. Returns the plan and outcome."""
    config = settings.kafka.common()
    ledger = ledger_topic(settings)
    writer = None
    if not request.dry_run:
        ensure_topics(config, [TopicSpec(ledger, 1, LEDGER_CONFIG)])
        writer = KafkaTransactions(settings.kafka.producer_config(), transactional_id(settings), request.timeout_s)
    replayed = read_ledger(config, ledger, request.timeout_s)
    letters = read_dead_letters(config, settings.output.dead_letter_topic, request.since, request.timeout_s)
    todo = plan(letters, request.selection, replayed)
    if writer is None or not todo.pending:
        return todo, None if writer is None else ReplayOutcome(todo.selected, todo.already, todo.unreplayable)
    replayer = scorer(settings) if request.score else to_topic(settings.input.topic)
    started = time.monotonic()

    def progress(done: int, total: int) -> None:
        rate = done / max(time.monotonic() - started, 1e-9)
        log.info("replayed %d of %d dead letters (%.0f/s)", done, total, rate)

    outcome = replay(
        todo,
        replayed,
        writer,
        ledger,
        replayer,
        "score" if request.score else "input",
        request.per_transaction,
        request.rate,
        progress,
    )
    return todo, outcome


def scorer(settings: PipelineSettings) -> Replayer:
    """Replay by scoring: the live version's predictions to the output topic, failures to the DLQ again."""
    from streamserve.pipeline.subjects import prediction_prefix
    from streamserve.scoring import build_processor, load_model, resolve_versions

    versions = resolve_versions(settings, None, None)
    routing = Routing(live=load_model(settings, versions.live))
    processor = build_processor(settings, value_prefix=prediction_prefix(settings))  # as the worker writes them
    dlq = settings.output.dead_letter_topic
    live = versions.live
    log.info("scoring dead letters with %s %s (from %s)", settings.model.name, live.version, versions.live_origin)

    def records(letters: Sequence[DeadLetter]) -> list[list[OutputRecord]]:
        sources = [_as_source(letter, settings.input.topic) for letter in letters]
        position = {id(source): i for i, source in enumerate(sources)}
        per_letter: list[list[OutputRecord]] = [[] for _ in letters]
        result = processor.run(sources, routing)
        for topic, encoded in result.records():
            record = OutputRecord(topic, encoded.key, encoded.value, encoded.headers)
            per_letter[position[id(encoded.source)]].append(record)
        for rejected in result.rejected:
            key, value, headers = dead_letter(rejected)
            per_letter[position[id(rejected.source)]].append(OutputRecord(dlq, key, value, headers))
        return per_letter

    return records


def _as_source(letter: DeadLetter, input_topic: str) -> Source:
    """The original record as the worker saw it (its source position from the dead letter's headers)."""
    topic, partition, offset = letter.origin or (input_topic, -1, -1)
    return Source(topic, partition, offset, letter.key, letter.value, list(letter.headers), letter.timestamp_ms)
