"""The sink: the size check before produce (every record checked with its own headers, shared lists or not), and
when a batch counts as acknowledged."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from streamserve.errors import DeliveryError, RecordTooLarge
from streamserve.pipeline.limits import SIZE_MARGIN_BYTES, SizeLimits, record_size
from streamserve.pipeline.sink import InflightBatch, OutputSink
from streamserve.records import Headers, Source

LIMIT = 1000


@pytest.fixture
def sink() -> Iterator[OutputSink]:
    # No broker needed: records only wait in librdkafka's queue, purged at the end.
    found = OutputSink({"bootstrap.servers": "127.0.0.1:1", "log_level": 0}, SizeLimits(SIZE_MARGIN_BYTES + LIMIT))
    yield found
    found.producer.purge()
    found.producer.flush(0)


def value_filling(headers: Headers | None) -> bytes:
    """A value that makes a record with key b"k" and these headers exactly LIMIT bytes long."""
    return b"v" * (LIMIT - record_size(b"k", b"", headers))


def test_every_record_is_checked_with_its_own_headers_shared_lists_or_not(sink: OutputSink) -> None:
    batch = InflightBatch()
    small: Headers = [("streamserve.model.version", b"v1")]
    large: Headers = [("streamserve.model.version", b"v1"), ("traceparent", b"0" * 55)]
    for _ in range(3):  # the same list again and again
        sink.produce(batch, "out", b"k", value_filling(small), small)
    with pytest.raises(RecordTooLarge):
        sink.produce(batch, "out", b"k", value_filling(small), large)
    with pytest.raises(RecordTooLarge):
        sink.produce(batch, "out", b"k", value_filling(small) + b"v", small)
    sink.produce(batch, "out", b"k", value_filling(large), large)
    sink.produce(batch, "out", b"k", value_filling(None), None)
    with pytest.raises(RecordTooLarge):
        sink.produce(batch, "out", b"k", value_filling(None), [("h", b"")])
    assert batch.pending == 5, "a record refused for its size is not queued"


def test_produce_all_refuses_exactly_what_produce_refuses(sink: OutputSink) -> None:
    """The batch path works out a shared header list's size once: each record is still judged with its own."""
    small: Headers = [("streamserve.model.version", b"v1")]
    large: Headers = [("streamserve.model.version", b"v1"), ("traceparent", b"0" * 55)]
    records: list[tuple[bytes | None, bytes, Headers | None]] = [
        (b"k", value_filling(small), small),
        (b"k", value_filling(small), large),  # too large with the other list
        (b"k", value_filling(small), small),
        (b"k", value_filling(small) + b"v", small),  # one byte over
        (None, value_filling(small) + b"v", small),  # no key: fits
        (b"k", value_filling(large), large),
        (b"k", value_filling(None), None),
        (b"k", value_filling(None), [("h", b"")]),
    ]
    one_by_one = InflightBatch()
    refused_alone = []
    for position, (key, value, headers) in enumerate(records):
        try:
            sink.produce(one_by_one, "out", key, value, headers)
        except RecordTooLarge:
            refused_alone.append(position)
    batch = InflightBatch()
    keys, values, headers = (list(column) for column in zip(*records, strict=True))
    refused = sink.produce_all(batch, "out", keys, values, headers)
    assert [position for position, _ in refused] == refused_alone == [1, 3, 7]
    assert all(isinstance(exc, RecordTooLarge) and exc.stage for _, exc in refused)
    assert batch.pending == one_by_one.pending == len(records) - 3


def test_a_batch_is_not_acknowledged_while_librdkafka_holds_its_records_and_a_failed_one_fails_it(
    sink: OutputSink,
) -> None:
    # No broker answers: the records stay queued until purged, and then each one's failure is reported.
    first, second = InflightBatch(), InflightBatch()
    first.cover([Source("in", 0, 7, None, b"", None, 0)])
    sink.produce_all(first, "out", [b"k"] * 3, [b"v"] * 3, [None] * 3)
    sink.seal(first)
    empty = InflightBatch()  # a batch with nothing to produce is acknowledged at once
    empty.cover([Source("in", 1, 3, None, b"", None, 0)])
    sink.seal(empty)
    sink.produce_all(second, "out", [b"k"], [b"v"], [None])
    sink.seal(second)
    for _ in range(3):
        sink.poll(0.05)
        assert sink.releasable() == [], "records still held: nothing may be committed"
        assert not first.done
        assert empty.done
        assert not second.done
    assert sink.inflight == 3

    sink.producer.purge()  # each queued record now fails: its failure is reported to its batch
    deadline = time.monotonic() + 10
    while len(sink.producer) and time.monotonic() < deadline:  # the count also holds unserved error events
        sink.poll(0.05)
    assert len(sink.producer) == 0
    assert first.done
    assert second.done
    assert first.error is not None
    assert "out" in first.error
    with pytest.raises(DeliveryError, match="input offsets stay uncommitted"):
        sink.releasable()
