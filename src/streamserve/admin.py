"""Topic administration: create the topics a pipeline needs, idempotently."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

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
