"""Dead-letter records: KIP-1034 and streamserve headers, bounded sizes, references for oversized values."""

from __future__ import annotations

import hashlib
import json

import pytest

from streamserve.errors import DecodeError, RecordTooLarge
from streamserve.pipeline.deadletter import (
    HEADER_KIP1034_EXCEPTION,
    HEADER_KIP1034_MESSAGE,
    HEADER_KIP1034_OFFSET,
    HEADER_KIP1034_PARTITION,
    HEADER_KIP1034_STACKTRACE,
    HEADER_KIP1034_TOPIC,
    HEADER_STAGE,
    HEADER_VALUE_REPLACED,
    MAX_MESSAGE_BYTES,
    MAX_STACKTRACE_BYTES,
    dead_letter,
    truncate,
)
from streamserve.pipeline.limits import SIZE_MARGIN_BYTES, SizeLimits, record_size
from streamserve.records import Rejected, Source

LIMIT = 100_000


def source(value: bytes | None, key: bytes | None = b"card-1", headers: list | None = None) -> Source:
    return Source("events", 3, 4242, key, value, headers, 1_700_000_000_000)


def rejected(value: bytes | None, **kwargs: object) -> Rejected:
    try:
        raise DecodeError("not an Avro event: " + "x" * 10)
    except DecodeError as exc:
        return Rejected.from_error(source(value, **kwargs), exc.stage, exc)  # type: ignore[arg-type]


def as_dict(headers: list) -> dict[str, bytes]:
    return {name: value for name, value in headers}


def test_a_record_that_fits_keeps_key_value_and_original_headers_and_gets_kip1034_headers() -> None:
    value = b"\x00\x01 not avro"
    key, out, headers = dead_letter(rejected(value, headers=[("trace", b"abc")]), LIMIT)
    assert (key, out) == (b"card-1", value)
    assert headers[0] == ("trace", b"abc"), "original headers first, untouched"
    h = as_dict(headers)
    assert h[HEADER_STAGE] == b"decode"
    assert h[HEADER_KIP1034_EXCEPTION] == b"DecodeError"
    assert h[HEADER_KIP1034_MESSAGE] == b"not an Avro event: " + b"x" * 10
    assert h[HEADER_KIP1034_TOPIC] == b"events"
    assert h[HEADER_KIP1034_PARTITION] == b"3"
    assert h[HEADER_KIP1034_OFFSET] == b"4242"
    assert h[HEADER_KIP1034_STACKTRACE].startswith(b"Traceback (most recent call last):")
    assert h[HEADER_KIP1034_STACKTRACE].rstrip().endswith(b"DecodeError: not an Avro event: xxxxxxxxxx")
    assert h["streamserve.dlq.source.offset"] == b"4242"
    assert h["streamserve.dlq.error.class"] == b"DecodeError"
    assert HEADER_VALUE_REPLACED not in h


def test_without_a_traceback_the_stacktrace_header_holds_the_exception_line() -> None:
    item = Rejected(source(b"v"), "infer", "InferenceError", "non-finite score")
    h = as_dict(dead_letter(item)[2])
    assert h[HEADER_KIP1034_STACKTRACE] == b"InferenceError: non-finite score"


def test_long_messages_and_stack_traces_are_cut_keeping_the_innermost_frames() -> None:
    message = "é" * 5000  # 2 bytes each: a cut must not split a character
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 5000 + "ValueError: the real cause\n"
    item = Rejected(source(b"v"), "features", "ValueError", message, trace)
    h = as_dict(dead_letter(item)[2])
    assert len(h[HEADER_KIP1034_MESSAGE]) <= MAX_MESSAGE_BYTES
    assert h[HEADER_KIP1034_MESSAGE].decode() == "é" * (MAX_MESSAGE_BYTES // 2)
    stack = h[HEADER_KIP1034_STACKTRACE]
    assert len(stack) <= MAX_STACKTRACE_BYTES
    assert stack.startswith(b"Traceback (most recent call last):")
    assert stack.endswith(b"ValueError: the real cause\n")
    assert b"bytes cut]" in stack


@pytest.mark.parametrize("limit", [50, 100, 1000, 4096])
def test_truncate_never_exceeds_its_limit(limit: int) -> None:
    for text in ("a" * 10_000, "€" * 10_000, "ab€" * 3333):
        assert len(truncate(text, limit)) <= limit
        cut = truncate(text, limit, keep_tail=True)
        assert len(cut) <= limit
        cut.decode()  # valid UTF-8


def test_an_oversized_value_is_replaced_by_a_reference_with_its_sha256_size_and_source() -> None:
    value = bytes(range(256)) * 500  # 128,000 bytes
    key, out, headers = dead_letter(rejected(value, headers=[("trace", b"abc")]), LIMIT)
    assert key == b"card-1"
    assert out is not None
    assert record_size(key, out, headers) <= LIMIT
    h = as_dict(headers)
    assert h[HEADER_VALUE_REPLACED] == b"reference"
    assert h["trace"] == b"abc"
    assert h[HEADER_STAGE] == b"decode", "the reason headers stay"
    reference = json.loads(out)
    assert reference["value"] == {"size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    assert reference["source"] == {"topic": "events", "partition": 3, "offset": 4242, "timestamp_ms": 1_700_000_000_000}
    assert "exceeds the 100000-byte record limit" in reference["reason"]
    assert reference["headers_dropped"] == 0
    assert reference["key"] is None


def test_huge_original_headers_are_dropped_too_and_the_reference_says_so() -> None:
    value = b"v" * 10
    original = [("blob", b"h" * 60_000), ("blob2", b"h" * 60_000)]
    key, out, headers = dead_letter(rejected(value, headers=original), LIMIT)
    assert record_size(key, out, headers) <= LIMIT
    h = as_dict(headers)
    assert "blob" not in h
    assert h[HEADER_VALUE_REPLACED] == b"reference"
    reference = json.loads(out or b"")
    assert reference["headers_dropped"] == 2
    assert reference["value"]["sha256"] == hashlib.sha256(value).hexdigest()
    assert key == b"card-1"


def test_a_huge_key_is_dropped_last_with_its_digest_in_the_reference() -> None:
    big_key = b"k" * 150_000
    key, out, headers = dead_letter(rejected(b"v", key=big_key), LIMIT)
    assert key is None
    assert record_size(key, out, headers) <= LIMIT
    reference = json.loads(out or b"")
    assert reference["key"] == {"size": len(big_key), "sha256": hashlib.sha256(big_key).hexdigest()}
    assert reference["key_dropped"] is True


def test_a_null_value_has_no_digest() -> None:
    _, out, _ = dead_letter(rejected(None, headers=[("blob", b"h" * 200_000)]), LIMIT)
    assert json.loads(out or b"")["value"] is None


def test_size_limits_take_the_smallest_of_producer_and_topic_minus_the_margin() -> None:
    limits = SizeLimits(1_000_000, {"dlq": 200_000, "out": 5_000_000})
    assert limits.max_record_bytes("dlq") == 200_000 - SIZE_MARGIN_BYTES
    assert limits.max_record_bytes("out") == 1_000_000 - SIZE_MARGIN_BYTES
    assert limits.max_record_bytes("unknown") == 1_000_000 - SIZE_MARGIN_BYTES
    assert limits.max_batch_bytes == 200_000 - SIZE_MARGIN_BYTES
    assert SizeLimits(1_000_000).max_batch_bytes == 1_000_000 - SIZE_MARGIN_BYTES


def test_record_size_counts_key_value_and_every_header() -> None:
    assert record_size(None, None, None) == record_size(b"", b"", [])
    base = record_size(b"k", b"v", [])
    assert record_size(b"k", b"v", [("name", b"x" * 100)]) > base + 104
    assert record_size(b"k", b"v", [("name", "é")]) == record_size(b"k", b"v", [("name", "é".encode())])


def test_record_too_large_is_a_produce_stage_record_error() -> None:
    exc = RecordTooLarge("predictions", 2_000_000, 995_904)
    assert exc.stage == "produce"
    assert "2000000-byte record exceeds the 995904-byte limit for topic predictions" in str(exc)
