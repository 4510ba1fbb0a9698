"""Dead letters read back: grouped for inspection, and replayed at most once each.

A dead letter (pipeline/deadletter.py) carries the original key, value and headers plus headers saying the
stage, the error and the source offset. ``inspect`` groups them by stage and reason. ``replay`` re-produces the
original key, value and headers to the input topic (or hands them to a scorer that turns them into predictions
and new dead letters), and records each replayed dead letter, keyed by its DLQ topic, partition and offset, in a
compacted replay-ledger topic. The records and their ledger entries are written in one Kafka transaction under a
transactional id fixed per DLQ topic: a replay killed mid-way leaves an open transaction that the next replay's
``init_transactions`` aborts, so every dead letter is replayed at most once, and exactly once after a replay
completes. Any record can be read: one that is no streamserve dead letter is reported, never replayed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from streamserve.pipeline.deadletter import (
    HEADER_ERROR_CLASS,
    HEADER_ERROR_MESSAGE,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    HEADER_STAGE,
    HEADER_VALUE_REPLACED,
)
from streamserve.records import Headers, Source

log = logging.getLogger(__name__)

OWN_HEADER_PREFIXES = ("streamserve.dlq.", "__streams.errors.")
"""Headers the worker added to a dead letter; every other header is the original record's."""
UNREADABLE = "(not a dead letter)"
"""Stage and reason of records that carry no streamserve dead-letter headers."""
HANG_AFTER_ENV = "STREAMSERVE_TEST_REPLAY_HANG_AFTER"
"""Test hook: after this many dead letters are written inside an open transaction, the replay hangs (so a test can
SIGKILL it mid-transaction deterministically)."""


class OutputRecord(NamedTuple):
    """A record to produce; ``partition`` None: the producer's partitioner chooses."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the DLQ topic, its original parts separated from the reason headers."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    """The original record's headers (the worker's own dead-letter headers removed)."""
    stage: str
    reason: str
    """The error class (FeatureError, DecodeError, ...)."""
    message: str
    source: str
    """Where the original record was: topic/partition@offset, or ``?``."""
    origin: tuple[str, int, int] | None = None
    """The original record's topic, partition and offset, when the headers say them."""
    problem: str | None = None
    """Why it cannot be replayed (no dead-letter headers, value replaced by a reference); None when it can."""

    @property
    def ledger_key(self) -> bytes:
        """Its key in the replay ledger: the DLQ topic, partition and offset (a dead letter's identity)."""
        return f"{self.topic}:{self.partition}:{self.offset}".encode()

    @property
    def replayable(self) -> bool:
        """It carries the original key, value and headers."""
        return self.problem is None


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


def parse_dead_letter(record: Source) -> DeadLetter:
    """The dead letter a DLQ record holds; any record parses (a foreign one is marked with a problem)."""
    own: dict[str, str] = {}
    original: Headers = []
    for name, value in record.headers or []:
        if isinstance(name, str) and name.startswith(OWN_HEADER_PREFIXES):
            own[name] = _text(value)
        else:
            original.append((name, value))
    source = "?"
    partition, offset = own.get(HEADER_SOURCE_PARTITION, ""), own.get(HEADER_SOURCE_OFFSET, "")
    if HEADER_SOURCE_TOPIC in own:
        source = f"{own[HEADER_SOURCE_TOPIC]}/{partition or '?'}@{offset or '?'}"
    origin = None
    if HEADER_SOURCE_TOPIC in own and partition.isdigit() and offset.isdigit():
        origin = (own[HEADER_SOURCE_TOPIC], int(partition), int(offset))
    problem = None
    if not own.get(HEADER_STAGE):
        problem = "no streamserve.dlq.stage header: not a streamserve dead letter"
    elif origin is None:
        problem = "no source topic/partition/offset headers: not a whole streamserve dead letter"
    elif HEADER_VALUE_REPLACED in own:
        problem = "its value was too large to dead-letter and was replaced by a reference"
    return DeadLetter(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp_ms,
        key=record.key,
        value=record.value,
        headers=original,
        stage=own.get(HEADER_STAGE) or UNREADABLE,
        reason=own.get(HEADER_ERROR_CLASS) or UNREADABLE,
        message=own.get(HEADER_ERROR_MESSAGE, ""),
        source=source,
        origin=origin,
        problem=problem,
    )


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command is about: --stage, --reason, --since."""

    stage: str | None = None
    reason: str | None = None
    """The error class, or a piece of the error message (case-insensitive)."""
    since_ms: int | None = None

    def __call__(self, letter: DeadLetter) -> bool:
        """Whether the dead letter is selected."""
        if self.stage is not None and letter.stage != self.stage:
            return False
        if self.since_ms is not None and letter.timestamp_ms < self.since_ms:
            return False
        if self.reason is not None:
            wanted = self.reason.lower()
            return letter.reason.lower() == wanted or wanted in letter.message.lower()
        return True


@dataclass
class Group:
    """The dead letters of one stage and reason."""

    stage: str
    reason: str
    count: int = 0
    first_ms: int = 0
    last_ms: int = 0
    sample: DeadLetter | None = None
    messages: dict[str, int] = field(default_factory=dict)
    """Distinct error messages (the first few) and their counts."""

    def add(self, letter: DeadLetter) -> None:
        """Count one more dead letter of this group."""
        if self.count == 0:
            self.first_ms, self.last_ms, self.sample = letter.timestamp_ms, letter.timestamp_ms, letter
        self.count += 1
        self.first_ms = min(self.first_ms, letter.timestamp_ms)
        self.last_ms = max(self.last_ms, letter.timestamp_ms)
        if letter.message in self.messages or len(self.messages) < 5:
            self.messages[letter.message] = self.messages.get(letter.message, 0) + 1


def inspect(letters: Iterable[DeadLetter], selected: Callable[[DeadLetter], bool]) -> tuple[int, list[Group]]:
    """How many dead letters were read, and the selected ones grouped."""
    read = 0

    def counted() -> Iterator[DeadLetter]:
        nonlocal read
        for letter in letters:
            read += 1
            if selected(letter):
                yield letter

    groups = group(counted())
    return read, groups


def group(letters: Iterable[DeadLetter]) -> list[Group]:
    """Dead letters grouped by stage and reason, the largest group first."""
    groups: dict[tuple[str, str], Group] = {}
    for letter in letters:
        key = (letter.stage, letter.reason)
        if key not in groups:
            groups[key] = Group(letter.stage, letter.reason)
        groups[key].add(letter)
    return sorted(groups.values(), key=lambda g: (-g.count, g.stage, g.reason))


def sample_lines(letter: DeadLetter, max_value_bytes: int = 0) -> list[str]:
    """A dead letter for people: where it is, its original key, value size and headers."""
    headers = ", ".join(f"{name}={_shown(value)}" for name, value in letter.headers) or "none"
    lines = [
        f"dead letter {letter.topic}/{letter.partition}@{letter.offset}, source {letter.source}",
        f"key {_shown(letter.key)}, value {len(letter.value) if letter.value is not None else 'null'} bytes, "
        f"original headers: {headers}",
    ]
    if letter.problem:
        lines.append(f"not replayable: {letter.problem}")
    return lines


def _shown(value: str | bytes | None, limit: int = 60) -> str:
    """A key or header value, printable and short."""
    if value is None:
        return "null"
    text = _text(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --- replay -------------------------------------------------------------------------------------------------


class TransactionalWriter(Protocol):
    """What replay needs of a transactional producer (a Kafka one, or a fake in unit tests)."""

    def begin(self) -> None:
        """Open a transaction."""
        ...

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None, partition: int | None = None
    ) -> None:
        """Write one record inside the open transaction (to `partition`, when given)."""
        ...

    def commit(self) -> None:
        """Commit the open transaction (every record of it is visible, or none is)."""
        ...


Replayer = Callable[[Sequence[DeadLetter]], list[list[OutputRecord]]]
"""Turns dead letters into the records that replay each of them (a list per dead letter, in order): the original
record to the input topic, or the prediction or new dead letter of scoring it."""


def to_topic(topic: str) -> Replayer:
    """Replay by re-producing each dead letter's original key, value and headers to a topic; to the partition it
    came from when it came from that topic, so a key stays in its partition whatever partitioner wrote it."""

    def records(letters: Sequence[DeadLetter]) -> list[list[OutputRecord]]:
        return [
            [OutputRecord(topic, letter.key, letter.value, list(letter.headers), _partition_in(letter, topic))]
            for letter in letters
        ]

    return records


def _partition_in(letter: DeadLetter, topic: str) -> int | None:
    """The partition the dead letter's original record was read from, if it was read from `topic`."""
    return letter.origin[1] if letter.origin is not None and letter.origin[0] == topic else None


@dataclass
class ReplayOutcome:
    """What a replay did."""

    selected: int = 0
    already: int = 0
    """Selected dead letters the ledger says were replayed before."""
    unreplayable: int = 0
    replayed: int = 0
    written: int = 0
    """Records written (beside the ledger entries)."""


def ledger_entry(letter: DeadLetter, mode: str, now_ms: int) -> bytes:
    """The ledger record's value: when and how the dead letter was replayed, and what it was."""
    return json.dumps(
        {"replayed_at": now_ms, "mode": mode, "stage": letter.stage, "reason": letter.reason, "source": letter.source},
        separators=(",", ":"),
    ).encode()


@dataclass(frozen=True)
class ReplayPlan:
    """The selected dead letters split into what a replay writes and what it leaves."""

    pending: list[DeadLetter]
    already: int
    unreplayable: int
    selected: int


def plan(letters: Iterable[DeadLetter], selected: Callable[[DeadLetter], bool], ledger: set[bytes]) -> ReplayPlan:
    """The selected dead letters not yet in the ledger and replayable, in DLQ order."""
    pending: list[DeadLetter] = []
    already = unreplayable = count = 0
    for letter in letters:
        if not selected(letter):
            continue
        count += 1
        if letter.ledger_key in ledger:
            already += 1
        elif not letter.replayable:
            unreplayable += 1
        else:
            pending.append(letter)
    return ReplayPlan(pending, already, unreplayable, count)


def replay(
    todo: ReplayPlan,
    ledger: set[bytes],
    writer: TransactionalWriter,
    ledger_topic: str,
    replayer: Replayer,
    mode: str,
    per_transaction: int = 500,
    rate: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayOutcome:
    """Write the plan's dead letters, per_transaction at a time, each transaction holding their records and their
    ledger entries; ``rate``: at most this many dead letters per second. ``ledger`` gains every committed key."""
    outcome = ReplayOutcome(todo.selected, todo.already, todo.unreplayable)
    hang_after = int(os.environ.get(HANG_AFTER_ENV, "0") or 0)
    started = time.monotonic()
    sent = 0
    for first in range(0, len(todo.pending), per_transaction):
        chunk = todo.pending[first : first + per_transaction]
        writer.begin()
        now_ms = int(time.time() * 1000)
        for letter, records in zip(chunk, replayer(chunk), strict=True):
            if rate:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # a throttle, so a large replay does not flood the workers
            for topic, key, value, headers, partition in records:
                writer.produce(topic, key, value, headers, partition)
                outcome.written += 1
            writer.produce(ledger_topic, letter.ledger_key, ledger_entry(letter, mode, now_ms), None)
            sent += 1
            if hang_after and sent == hang_after:
                _hang(writer)
        writer.commit()
        ledger.update(letter.ledger_key for letter in chunk)
        outcome.replayed += len(chunk)
        if progress is not None:
            progress(outcome.replayed, len(todo.pending))
    return outcome


def _hang(writer: TransactionalWriter) -> None:
    """The test hook: make what was written so far reach the brokers, then wait to be killed."""
    flush = getattr(writer, "flush", None)
    if flush is not None:
        flush()
    log.warning("%s reached: hanging inside an open transaction until killed", HANG_AFTER_ENV)
    while True:
        time.sleep(3600)


def summary(todo: ReplayPlan, outcome: ReplayOutcome | None) -> str:
    """One line saying what a replay did (outcome) or would do (a dry run: None)."""
    done = f"replayed {outcome.replayed}" if outcome is not None else f"would replay {len(todo.pending)}"
    return (
        f"{done} of {todo.selected} selected dead letter(s); {todo.already} replayed before (in the ledger), "
        f"{todo.unreplayable} not replayable"
    )


def as_json(groups: list[Group]) -> list[dict[str, Any]]:
    """Groups as JSON-ready dicts."""
    return [
        {
            "stage": g.stage,
            "reason": g.reason,
            "count": g.count,
            "first_seen_ms": g.first_ms,
            "last_seen_ms": g.last_ms,
            "messages": g.messages,
            "sample": None
            if g.sample is None
            else {
                "dlq": f"{g.sample.topic}/{g.sample.partition}@{g.sample.offset}",
                "source": g.sample.source,
                "key": _text(g.sample.key) if g.sample.key is not None else None,
                "value_bytes": len(g.sample.value) if g.sample.value is not None else None,
                "headers": {name: _text(value) for name, value in g.sample.headers},
                "replayable": g.sample.replayable,
            },
        }
        for g in groups
    ]
