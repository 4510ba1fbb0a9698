"""Dead-letter records: the original key, value and headers, plus headers saying what failed where."""

from __future__ import annotations

from streamserve.records import Headers, Rejected

HEADER_STAGE = "streamserve.dlq.stage"
HEADER_ERROR_CLASS = "streamserve.dlq.error.class"
HEADER_ERROR_MESSAGE = "streamserve.dlq.error.message"
HEADER_SOURCE_TOPIC = "streamserve.dlq.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.dlq.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.dlq.source.offset"

_MAX_MESSAGE_BYTES = 2000


def dead_letter(rejected: Rejected) -> tuple[bytes | None, bytes | None, Headers]:
    """The DLQ record for a rejected input: its bytes untouched, the reason in headers."""
    source = rejected.source
    headers: Headers = list(source.headers or [])
    headers += [
        (HEADER_STAGE, rejected.stage.encode()),
        (HEADER_ERROR_CLASS, rejected.error_class.encode()),
        (HEADER_ERROR_MESSAGE, rejected.message.encode()[:_MAX_MESSAGE_BYTES]),
        (HEADER_SOURCE_TOPIC, source.topic.encode()),
        (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
        (HEADER_SOURCE_OFFSET, str(source.offset).encode()),
    ]
    return source.key, source.value, headers
