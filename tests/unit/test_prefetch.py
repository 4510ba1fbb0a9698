"""The next batch's Redis round trip started ahead: same outcome as without it, one round trip, and a failed
lookup handled by the Redis policy like any other; the batcher holds one batch ahead and tells what comes next."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from streamserve.config import FeatureSpec
from streamserve.errors import EnrichError
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import decode_prediction
from streamserve.pipeline.features import FeatureRequest, PendingReplies, Replies
from streamserve.pipeline.process import BatchProcessor, BatchResult
from streamserve.pipeline.routing import Routing
from streamserve.records import Source
from tests.unit.test_process import SCHEMAS, avro, make_processor

FEATURES = [
    FeatureSpec(name="queue", source="event", field="queue", dtype="string", input="queue"),
    FeatureSpec(name="wait_s", source="redis", key="queue:{queue}", field="wait", input="wait_s", default=0.0),
]
WAITS = {"queue:billing": b"12.5", "queue:tech": b"3.25"}


class Store:
    """Hash replies from a dict, sent ahead as RedisFetcher.start does: counts the lookups sent and the ones whose
    replies were read or cancelled, or fails them all as a Redis outage past its retries."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[list[str]] = []
        self.read: list[list[str]] = []
        self.cancelled: list[list[str]] = []

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        return self.start(requests).result()

    def start(self, requests: Sequence[FeatureRequest]) -> PendingReplies:
        keys = [key for _, group in requests for key in group]
        self.sent.append(keys)
        pending = Pending(self, keys, [Replies([WAITS.get(key) for key in group]) for _, group in requests])
        return PendingReplies(requests, pending.result, pending.cancel, sent=True)


class Pending:
    def __init__(self, store: Store, keys: list[str], replies: list[Replies]) -> None:
        self.store, self.keys, self.replies = store, keys, replies
        self.cancelled = False

    def result(self) -> list[Replies]:
        assert not self.cancelled, "the replies of a cancelled lookup were read"
        self.store.read.append(self.keys)
        if self.store.fail:
            raise EnrichError("Redis unavailable after 3 attempts: ConnectionError: refused")
        return self.replies

    def cancel(self) -> None:
        self.cancelled = True
        self.store.cancelled.append(self.keys)


def processor(
    tmp_path: Path, store: Store, on_redis_error: str = "dead_letter", ahead: bool = True
) -> tuple[BatchProcessor, Routing]:
    return make_processor(tmp_path, FEATURES, store, on_redis_error, start_fetch=store.start if ahead else None)


def sources(n: int, first_offset: int = 0) -> list[Source]:
    """Events of their own per offset (ids, and queues in a pattern that shifts with the offset)."""
    values = [
        avro({"id": f"t{first_offset + i}", "queue": ["billing", "tech"][(first_offset + i) % 3 % 2], "wait_s": None})
        for i in range(n)
    ]
    values[3] = b"\x00\xff\x13"  # not a record: rejected at decode, with or without the head start
    return [Source("in", 0, first_offset + i, None, value, None, 0) for i, value in enumerate(values)]


def outcome(result: Any) -> tuple[dict[str, float], dict[int, str]]:
    schema = load_schema(SCHEMAS / "prediction.avsc")
    scores = {}
    for _, record in result.records():
        prediction = decode_prediction(schema, record.value)
        scores[str(prediction["event_id"])] = float(prediction["score"])  # type: ignore[arg-type]
    return scores, {item.source.offset: item.stage for item in result.rejected}


def test_a_prefetched_batch_comes_out_as_without_it_with_one_round_trip(tmp_path: Path) -> None:
    plain, routing = processor(tmp_path, Store())
    store = Store()
    ahead, _ = processor(tmp_path, store)
    batch = sources(60)
    expected = outcome(plain.run(batch, routing))

    ahead.prefetch(batch)
    assert len(store.sent) == 1, "the lookup went out when prefetched"
    assert not store.read, "its replies are read when the batch runs"
    result = ahead.run(list(batch), routing)  # the very same records, in another list

    assert outcome(result) == expected
    assert expected[1] == {3: "decode"}
    assert len(expected[0]) == 59
    assert len(store.sent) == len(store.read) == 1, "the lookup sent ahead is the batch's only one"
    assert sorted(store.read[0]) == ["queue:billing", "queue:tech"]


def test_each_batch_uses_its_own_head_start_while_the_next_one_is_sent(tmp_path: Path) -> None:
    """The worker's order: the next batch is prefetched before the current one runs."""
    plain, routing = processor(tmp_path, Store())
    store = Store()
    run, _ = processor(tmp_path, store)
    batches = [sources(20, first_offset=20 * i) for i in range(4)]
    for current, following in zip(batches, [*batches[1:], None], strict=True):
        if following is not None:
            run.prefetch(following)
        assert outcome(run.run(current, routing)) == outcome(plain.run(current, routing))
    assert len(store.sent) == 4, "one lookup per batch: batches 2-4 sent ahead, batch 1 when it ran"
    assert len(store.read) == 4
    assert not store.cancelled, "every head start was used"


def test_other_records_than_the_prefetched_ones_are_processed_from_scratch(tmp_path: Path) -> None:
    store = Store()
    run, routing = processor(tmp_path, store)
    batch = sources(40)
    run.prefetch(batch)
    revoked = batch[:20]  # records of a lost partition dropped from the batcher in between
    expected = outcome(processor(tmp_path, Store())[0].run(revoked, routing))
    assert outcome(run.run(revoked, routing)) == expected
    assert len(store.sent) == 2, "the head start is not used for other records"
    for offset in (100, 200, 300):  # the unused head start is forgotten once newer ones are held
        run.prefetch(sources(10, first_offset=offset))
    assert len(store.cancelled) == 2, "at most PREFETCHED batches are held: the older ones' replies are dropped"
    run.drop_prefetched()
    assert len(store.cancelled) == 4
    assert run.run(batch, routing).predictions == 39, "nothing kept from the head start that was not used"


def test_a_fetcher_that_cannot_send_ahead_is_called_when_the_batch_runs(tmp_path: Path) -> None:
    store = Store()
    run, routing = processor(tmp_path, store, ahead=False)  # a plain function as the fetcher
    batch = sources(30)
    run.prefetch(batch)
    assert not store.sent, "nothing to send ahead with"
    assert run.run(batch, routing).predictions == 29
    assert len(store.sent) == 1


@pytest.mark.parametrize("policy", ["dead_letter", "defaults", "fail"])
def test_a_failed_lookup_started_ahead_meets_the_redis_policy(tmp_path: Path, policy: str) -> None:
    run, routing = processor(tmp_path, Store(fail=True), on_redis_error=policy)
    batch = sources(30)
    run.prefetch(batch)
    if policy == "fail":
        with pytest.raises(EnrichError):
            run.run(batch, routing)
        return
    result = run.run(batch, routing)
    plain, _ = processor(tmp_path, Store(fail=True), on_redis_error=policy)
    assert outcome(result) == outcome(plain.run(batch, routing))
    scores, stages = outcome(result)
    if policy == "dead_letter":  # the outage's stage for every decoded record
        assert not scores
        assert stages == {offset: EnrichError.stage for offset in range(30) if offset != 3} | {3: "decode"}
    else:  # every Redis feature takes its default; the batch is flagged degraded
        assert len(scores) == 29
        assert result.degraded == 29


def test_the_batcher_holds_one_batch_ahead_and_says_what_comes_next() -> None:
    batcher: MicroBatcher[int] = MicroBatcher(max_batch_size=4, max_wait_ms=1000, ahead=1)
    assert batcher.room == 4, "while the open batch is not full, only what it lacks"
    batcher.add(range(3))
    assert batcher.room == 1
    batcher.add(range(3, 6))
    assert batcher.room == 2, "a full batch held: room for the one ahead"
    assert batcher.peek() == [0, 1, 2, 3]
    assert batcher.take() == [0, 1, 2, 3]
    assert batcher.peek() is None, "two items: the next batch is not decided yet"
    batcher.add(range(6, 12))  # (the worker polls for room; a bigger chunk is kept all the same)
    assert batcher.room == 0
    assert batcher.peek() == [4, 5, 6, 7]
    assert batcher.take() == [4, 5, 6, 7]
    assert batcher.ready(), "a full batch held ahead is ready at once"


def test_a_batch_whose_decoding_would_ask_the_registry_is_not_prepared_ahead(tmp_path: Path) -> None:
    """Decoding ahead must never wait for a Schema Registry (its wait policy would hold the batch before it)."""
    store = Store()
    run, routing = processor(tmp_path, store)
    asked: list[int] = []

    class Unknown(LocalSchemaDecoder):
        def decodes_now(self, values: Sequence[bytes | None]) -> bool:
            asked.append(len(values))
            return False

    run.decode = Unknown(run.decode.schema)  # type: ignore[attr-defined]
    batch = sources(30)
    run.prefetch(batch)
    assert asked == [30]
    assert not store.sent, "nothing decoded or sent ahead"
    assert run.run(batch, routing).predictions == 29
    assert run.used_ahead == 0


def test_events_decoded_elsewhere_have_their_lookup_sent_ahead_too(tmp_path: Path) -> None:
    """Batch scoring's order (batch/scoring.py): rows read as events, the next batch's lookup sent, this one run."""
    plain, routing = processor(tmp_path, Store())
    store = Store()
    run, _ = processor(tmp_path, store)
    batches = [sources(20, first_offset=20 * i) for i in range(4)]
    decoded = []
    for batch in batches:
        result = BatchResult()
        decoded.append((run.decode_batch(batch, result), result.rejected))
    for (events, rejected), following in zip(decoded, [*decoded[1:], None], strict=True):
        if following is not None:
            run.prefetch_decoded(following[0])
        expected = outcome(plain.run_decoded(list(events), routing, rejected))
        assert outcome(run.run_decoded(events, routing, rejected)) == expected
    assert len(store.sent) == len(store.read) == 4, "one lookup per batch: batches 2-4 sent ahead"
    assert run.used_ahead == 3
    assert not store.cancelled
    other = decoded[0][0]
    run.prefetch_decoded(other)
    assert run.run_decoded(list(other), routing).predictions == len(other), "another list: fetched from scratch"
    assert len(store.sent) == 6
    run.prefetch(batches[0])  # a batch of records: never taken for the events decoded elsewhere, nor the reverse
    assert run.run_decoded(other, routing).predictions == len(other)
    assert run.used_ahead == 4
