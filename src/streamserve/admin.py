"""Topic administration: create the topics a pipeline needs, idempotently; read their size limits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streamserve.config import PipelineSettings

log = logging.getLogger(__name__)

LibrdkafkaConfig = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create when missing."""

    name: str
    partitions: int = 1
    config: dict[str, str] = field(default_factory=dict)


def ensure_topics(client_config: LibrdkafkaConfig, topics: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Create missing topics; existing ones are left as they are."""
    admin = AdminClient(dict(client_config))
    futures = admin.create_topics(
        [NewTopic(t.name, num_partitions=t.partitions, replication_factor=-1, config=t.config) for t in topics],
        operation_timeout=timeout_s,
        request_timeout=timeout_s,
    )
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            log.info("created topic %s", name)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise


def pipeline_topics(settings: PipelineSettings, partitions: int) -> list[TopicSpec]:
    """Every topic a pipeline reads or writes; control and status topics are compacted."""
    compacted = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1", "segment.ms": "60000"}
    return [
        TopicSpec(settings.input.topic, partitions),
        TopicSpec(settings.output.topic, partitions),
        TopicSpec(settings.shadow_topic, partitions),
        TopicSpec(settings.output.dead_letter_topic, 1),
        TopicSpec(settings.control.topic, 1, compacted),
        TopicSpec(settings.control.status_topic, 1, compacted),
    ]


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
