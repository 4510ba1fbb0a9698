"""The sink's size check before produce: every record checked with its own headers, shared lists or not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streamserve.errors import RecordTooLarge
from streamserve.pipeline.sink import SIZE_MARGIN_BYTES, InflightBatch, OutputSink, SizeLimits, record_size
from streamserve.records import Headers

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
