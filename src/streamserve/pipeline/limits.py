"""Record size limits: how librdkafka counts a record, and the limits of the producer and of the topics it writes to.

The limits are read once at start (``size_limits``, by the wiring) and handed to the sink, which checks every
record against them before producing it, and to the dead-letter builder, which trims a record to fit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from streamserve.records import Headers

log = logging.getLogger(__name__)

LibrdkafkaConfig = Mapping[str, str | int | float | bool]

DEFAULT_MESSAGE_MAX_BYTES = 1_000_000
"""librdkafka's default message.max.bytes (and batch.size)."""
RECORD_OVERHEAD_BYTES = 36
"""librdkafka's upper bound of a v2 record's framing (length, attributes, deltas, key/value/header counts)."""
HEADER_OVERHEAD_BYTES = 10
"""Upper bound of one header's framing: the varint lengths of its name and value."""
SIZE_MARGIN_BYTES = 4096
"""Kept free under every limit: the record batch header (61 bytes), compression framing (librdkafka sends a
batch uncompressed when compressing does not shrink it), and room for error."""


def record_size(key: bytes | None, value: bytes | None, headers: Headers | None) -> int:
    """Upper bound of a record's serialized size, as librdkafka counts it against message.max.bytes."""
    size = RECORD_OVERHEAD_BYTES + len(key or b"") + len(value or b"")
    for name, header_value in headers or ():
        if isinstance(header_value, str):
            header_value = header_value.encode()
        size += HEADER_OVERHEAD_BYTES + len(name.encode()) + len(header_value or b"")
    return size


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """The message.max.bytes of the producer and the max.message.bytes of the topics it writes to."""

    producer_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES
    topic_max_bytes: Mapping[str, int] = field(default_factory=dict)
    """Topics whose limit is unknown are bounded by the producer's limit alone."""

    def max_record_bytes(self, topic: str) -> int:
        """The largest record (as record_size() counts) that may be produced to `topic`."""
        limit = min(self.producer_max_bytes, self.topic_max_bytes.get(topic, self.producer_max_bytes))
        return limit - SIZE_MARGIN_BYTES

    @property
    def max_batch_bytes(self) -> int:
        """A cap for librdkafka's batch.size, so that a batch of small records never exceeds a topic's limit."""
        return min([self.producer_max_bytes, *self.topic_max_bytes.values()]) - SIZE_MARGIN_BYTES


def topic_max_message_bytes(
    client_config: LibrdkafkaConfig, topics: list[str], timeout_s: float = 10.0
) -> dict[str, int]:
    """Each topic's max.message.bytes (its own or the broker's default); topics that cannot be read are left out."""
    admin = AdminClient(dict(client_config))
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in dict.fromkeys(topics)]
    limits: dict[str, int] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=timeout_s).items():
        try:
            entries = future.result(timeout=timeout_s)
            limits[resource.name] = int(entries["max.message.bytes"].value)
        except (KafkaException, TimeoutError, KeyError, ValueError, TypeError) as exc:
            log.warning("cannot read max.message.bytes of topic %s: %s", resource.name, exc)
    return limits


def size_limits(
    producer_config: LibrdkafkaConfig,
    admin_config: LibrdkafkaConfig,
    topics: list[str],
    timeout_s: float = 10.0,
) -> SizeLimits:
    """Read the limits once at start; a topic whose limit cannot be read falls back to the producer's, with a
    warning (a topic created later by the broker gets the broker's message.max.bytes, 1048588 by default)."""
    producer_max = int(producer_config.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES))
    found = topic_max_message_bytes(dict(admin_config), topics, timeout_s)
    for topic in topics:
        if topic not in found:
            log.warning("max.message.bytes of %s unknown: bounded by the producer's %d alone", topic, producer_max)
    log.info("record size limits: producer %d, topics %s, minus %d bytes", producer_max, found, SIZE_MARGIN_BYTES)
    return SizeLimits(producer_max, found)
