"""Dead letters read back and replayed: parsing any record, selection, and the ledger's at-most-once rule."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.ops.deadletters import (
    UNREADABLE,
    DeadLetter,
    Selection,
    group,
    parse_dead_letter,
    plan,
    replay,
    summary,
    to_topic,
)
from streamserve.pipeline.deadletter import dead_letter
from streamserve.records import Headers, Rejected, Source


def _letter_record(offset: int, stage: str = "features", error: str = "FeatureError", value: bytes = b"v") -> Source:
    """A DLQ record as the worker writes it, for an input record at `offset` carrying one header of its own."""
    original = Source("in", 1, 1000 + offset, f"k{offset}".encode(), value, [("trace", b"t")], 5)
    rejected = Rejected(original, stage, error, f"feature merchant_risk missing for event {offset}")
    key, value_out, headers = dead_letter(rejected)
    return Source("dlq", 0, offset, key, value_out, headers, 1_000 + offset)


def test_a_dead_letter_gives_back_the_original_record_and_its_reason() -> None:
    letter = parse_dead_letter(_letter_record(7))
    assert (letter.key, letter.value, letter.headers) == (b"k7", b"v", [("trace", b"t")])
    assert (letter.stage, letter.reason, letter.origin) == ("features", "FeatureError", ("in", 1, 1007))
    assert letter.replayable
    assert letter.ledger_key == b"dlq:0:7"


def test_a_dead_letter_whose_value_was_replaced_is_not_replayable() -> None:
    original = Source("in", 0, 3, b"k", b"x" * 5000, None, 0)
    key, value, headers = dead_letter(Rejected(original, "decode", "DecodeError", "bad"), max_bytes=2000)
    letter = parse_dead_letter(Source("dlq", 0, 3, key, value, headers, 0))
    assert not letter.replayable
    assert "reference" in (letter.problem or "")


header_values = st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=20))


@given(
    key=st.one_of(st.none(), st.binary(max_size=30)),
    value=st.one_of(st.none(), st.binary(max_size=60)),
    headers=st.one_of(
        st.none(),
        st.lists(
            st.tuples(
                st.sampled_from(["streamserve.dlq.stage", "streamserve.dlq.source.offset", "x", ""]), header_values
            ),
            max_size=6,
        ),
    ),
)
def test_any_record_parses_and_groups(key: bytes | None, value: bytes | None, headers: Headers | None) -> None:
    """Garbage on the DLQ topic is reported (grouped, shown), never fatal."""
    letter = parse_dead_letter(Source("dlq", 0, 1, key, value, headers, 0))
    stage_given = any(name == "streamserve.dlq.stage" and value for name, value in headers or [])
    assert group([letter])[0].count == 1
    if not stage_given:
        assert letter.stage == UNREADABLE
        assert not letter.replayable
        assert letter.problem


def test_selection_by_stage_reason_and_time() -> None:
    letters = [
        parse_dead_letter(_letter_record(1, "features", "FeatureError")),
        parse_dead_letter(_letter_record(2, "decode", "DecodeError")),
    ]
    assert [x.offset for x in letters if Selection(stage="decode")(x)] == [2]
    assert [x.offset for x in letters if Selection(reason="featureerror")(x)] == [1]
    assert [x.offset for x in letters if Selection(reason="merchant_risk missing")(x)] == [1, 2]
    assert [x.offset for x in letters if Selection(since_ms=1_002)(x)] == [2]


class Killed(Exception):
    """The replay process was killed (SIGKILL): its open transaction is never committed."""


class FakeTransactions:
    """A transactional producer: committed records are visible, an open transaction dies with its process."""

    def __init__(self) -> None:
        self.committed: list[tuple[str, bytes | None, bytes | None]] = []

    def process(self, killed_after: int | None) -> FakeProcess:
        return FakeProcess(self, killed_after)


class FakeProcess:
    def __init__(self, kafka: FakeTransactions, killed_after: int | None) -> None:
        self.kafka, self.killed_after, self.written = kafka, killed_after, 0
        self.open: list[tuple[str, bytes | None, bytes | None]] = []

    def begin(self) -> None:
        self.open = []

    def produce(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None, partition: int | None = None
    ) -> None:
        if self.killed_after is not None and self.written >= self.killed_after:
            raise Killed
        self.open.append((topic, key, value))
        self.written += 1

    def commit(self) -> None:
        if self.killed_after is not None and self.written >= self.killed_after:
            raise Killed  # killed between the last record and the commit
        self.kafka.committed += self.open


def _run(kafka: FakeTransactions, letters: list[DeadLetter], killed_after: int | None, per_transaction: int) -> None:
    """One `dlq replay` process, as run_replay does it: read the ledger, plan, replay."""
    ledger = {key for topic, key, _ in kafka.committed if topic == "ledger" and key is not None}
    todo = plan(letters, Selection(), ledger)
    with contextlib.suppress(Killed):
        replay(todo, ledger, kafka.process(killed_after), "ledger", to_topic("in"), "input", per_transaction)


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(0, 25),
    foreign=st.sets(st.integers(0, 24), max_size=5),
    kills=st.lists(st.integers(0, 60), max_size=5),
    per_transaction=st.integers(1, 8),
)
def test_any_sequence_of_replays_and_kills_replays_each_dead_letter_at_most_once(
    count: int, foreign: set[int], kills: list[int], per_transaction: int
) -> None:
    """After any replays killed anywhere, each dead letter was replayed at most once; a replay that completes
    makes it exactly once; one more replays nothing."""
    letters = [
        parse_dead_letter(Source("dlq", 0, i, b"k", b"not ours", None, 0) if i in foreign else _letter_record(i))
        for i in range(count)
    ]
    kafka = FakeTransactions()
    for killed_after in kills:
        _run(kafka, letters, killed_after, per_transaction)
        replayed = Counter(key for topic, key, _ in kafka.committed if topic == "in")
        assert all(n == 1 for n in replayed.values()), replayed
    _run(kafka, letters, None, per_transaction)
    replayed = Counter(key for topic, key, _ in kafka.committed if topic == "in")
    expected = {f"k{i}".encode() for i in range(count) if i not in foreign}
    assert set(replayed) == expected
    assert all(n == 1 for n in replayed.values())
    before = len(kafka.committed)
    _run(kafka, letters, None, per_transaction)
    assert len(kafka.committed) == before


def test_a_second_replay_finds_everything_in_the_ledger() -> None:
    letters = [parse_dead_letter(_letter_record(i)) for i in range(3)]
    kafka = FakeTransactions()
    _run(kafka, letters, None, 2)
    ledger = {key for topic, key, _ in kafka.committed if topic == "ledger" and key is not None}
    todo = plan(letters, Selection(), ledger)
    assert (todo.pending, todo.already, todo.selected) == ([], 3, 3)
    assert summary(todo, None).startswith("would replay 0 of 3")


@pytest.mark.parametrize("per_transaction", [1, 3])
def test_replay_writes_the_original_parts_and_a_ledger_entry_per_dead_letter(per_transaction: int) -> None:
    letters = [parse_dead_letter(_letter_record(i)) for i in range(4)]
    kafka = FakeTransactions()
    _run(kafka, letters, None, per_transaction)
    written = [(key, value) for topic, key, value in kafka.committed if topic == "in"]
    assert written == [(f"k{i}".encode(), b"v") for i in range(4)]
    assert [key for topic, key, _ in kafka.committed if topic == "ledger"] == [f"dlq:0:{i}".encode() for i in range(4)]
