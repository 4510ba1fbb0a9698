"""Dead-letter records: the original key, value and headers, plus headers saying what failed where.

The headers follow Kafka's own convention for dead letters (KIP-1034, the ``__streams.errors.*`` headers
Kafka Streams writes: exception, message, stack trace, source topic/partition/offset) beside streamserve's
``streamserve.dlq.*`` headers (the failed stage, and the same facts under our own names).

A dead letter must fit the producer's and the topic's size limit, or producing it would fail (and the
worker with it). One that would not fit keeps its headers but has its value replaced by a small JSON
reference to the source record (topic/partition/offset, size and sha256 of the value) and the reason,
marked by the ``streamserve.dlq.value.replaced`` header. Should that still not fit (huge original headers
or key), the original headers and then the key are dropped as well, and the reference says so.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from streamserve.pipeline.limits import record_size
from streamserve.records import Headers, Rejected

HEADER_STAGE = "streamserve.dlq.stage"
HEADER_ERROR_CLASS = "streamserve.dlq.error.class"
HEADER_ERROR_MESSAGE = "streamserve.dlq.error.message"
HEADER_SOURCE_TOPIC = "streamserve.dlq.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.dlq.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.dlq.source.offset"
HEADER_VALUE_REPLACED = "streamserve.dlq.value.replaced"
"""Present (value ``reference``) when the value is a JSON reference instead of the original bytes."""

# KIP-1034 names, as Kafka Streams' ExceptionHandlerUtils writes them (apache/kafka).
HEADER_KIP1034_EXCEPTION = "__streams.errors.exception"
HEADER_KIP1034_MESSAGE = "__streams.errors.message"
HEADER_KIP1034_STACKTRACE = "__streams.errors.stacktrace"
HEADER_KIP1034_TOPIC = "__streams.errors.topic"
HEADER_KIP1034_PARTITION = "__streams.errors.partition"
HEADER_KIP1034_OFFSET = "__streams.errors.offset"

REFERENCE_FORMAT = "streamserve.dlq.reference/v1"
MAX_MESSAGE_BYTES = 2000
"""Error messages are cut to this many bytes (a message may quote a whole record)."""
MAX_STACKTRACE_BYTES = 4096
"""Stack traces are cut to this many bytes, keeping their start and their end (the innermost frames)."""
_TRUNCATED = "\n... [{} bytes cut] ...\n"


def truncate(text: str, limit: int, keep_tail: bool = False) -> bytes:
    """UTF-8 of `text` in at most `limit` bytes; cut in the middle (keep_tail) or at the end, on a character."""
    data = text.encode()
    if len(data) <= limit:
        return data
    if not keep_tail:
        return data[:limit].decode(errors="ignore").encode()
    marker = _TRUNCATED.format(len(data)).encode()  # an upper bound of the count, so the marker never grows
    room = max(limit - len(marker), 0)
    head = data[: room // 4].decode(errors="ignore").encode()
    tail = data[len(data) - (room - len(head)) :].decode(errors="ignore").encode() if room > len(head) else b""
    cut = len(data) - len(head) - len(tail)
    return head + _TRUNCATED.format(cut).encode() + tail


def reason_headers(rejected: Rejected) -> Headers:
    """The headers saying what failed where: streamserve's and KIP-1034's, every one bounded in size."""
    source = rejected.source
    message = truncate(rejected.message, MAX_MESSAGE_BYTES)
    # Without a traceback, the exception line alone (what Python prints for an exception never raised).
    stacktrace = truncate(
        rejected.stacktrace or f"{rejected.error_class}: {rejected.message}", MAX_STACKTRACE_BYTES, keep_tail=True
    )
    topic, partition, offset = source.topic.encode(), str(source.partition).encode(), str(source.offset).encode()
    return [
        (HEADER_STAGE, rejected.stage.encode()),
        (HEADER_ERROR_CLASS, rejected.error_class.encode()),
        (HEADER_ERROR_MESSAGE, message),
        (HEADER_SOURCE_TOPIC, topic),
        (HEADER_SOURCE_PARTITION, partition),
        (HEADER_SOURCE_OFFSET, offset),
        (HEADER_KIP1034_EXCEPTION, rejected.error_class.encode()),
        (HEADER_KIP1034_MESSAGE, message),
        (HEADER_KIP1034_STACKTRACE, stacktrace),
        (HEADER_KIP1034_TOPIC, topic),
        (HEADER_KIP1034_PARTITION, partition),
        (HEADER_KIP1034_OFFSET, offset),
    ]


def _digest(data: bytes | None) -> dict[str, Any] | None:
    return None if data is None else {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _reference(rejected: Rejected, reason: str, keep_headers: bool, keep_key: bool) -> bytes:
    """The JSON that stands in for a value too large to dead-letter."""
    source = rejected.source
    original_headers = source.headers or []
    document = {
        "format": REFERENCE_FORMAT,
        "reason": reason,
        "source": {
            "topic": source.topic,
            "partition": source.partition,
            "offset": source.offset,
            "timestamp_ms": source.timestamp_ms,
        },
        "value": _digest(source.value),
        "key": None if keep_key else _digest(source.key),
        "key_dropped": not keep_key and source.key is not None,
        "headers_dropped": 0 if keep_headers else len(original_headers),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def dead_letter(rejected: Rejected, max_bytes: int | None = None) -> tuple[bytes | None, bytes | None, Headers]:
    """The DLQ record for a rejected input: its bytes untouched and the reason in headers, or, when that
    record would exceed `max_bytes` (see OutputSink.max_record_bytes), a reference in place of the value."""
    source = rejected.source
    ours = reason_headers(rejected)
    original: Headers = list(source.headers or [])
    full = record_size(source.key, source.value, original + ours)
    if max_bytes is None or full <= max_bytes:
        return source.key, source.value, original + ours
    reason = f"the dead letter ({full} bytes) exceeds the {max_bytes}-byte record limit; value replaced by reference"
    marked = [*ours, (HEADER_VALUE_REPLACED, b"reference")]
    record: tuple[bytes | None, bytes | None, Headers] = (None, None, marked)
    for keep_headers, keep_key in ((True, True), (False, True), (False, False)):
        key = source.key if keep_key else None
        headers = original + marked if keep_headers else marked
        record = key, _reference(rejected, reason, keep_headers, keep_key), headers
        if record_size(*record) <= max_bytes:
            break
    return record
