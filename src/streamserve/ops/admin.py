"""Kafka administration: create the topics a pipeline needs, idempotently; grant a pipeline's principals their
ACLs. (The topics' size limits a worker reads at start: pipeline/limits.py.)"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

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
        # streamserve monitor: labels in, unusable labels out, quality reports (the latest per model and window)
        TopicSpec(settings.labels_topic, partitions),
        TopicSpec(settings.labels_dead_letter_topic, 1),
        TopicSpec(settings.monitor.quality_topic, 1, compacted),
        *monitor_topics(settings, partitions),
        *(  # the training-set join's examples, keyed by event id
            [TopicSpec(settings.monitor.training_set_topic, partitions, {"cleanup.policy": "compact"})]
            if settings.monitor.feature_log
            else []
        ),
    ]


def monitor_topics(settings: PipelineSettings, partitions: int) -> list[TopicSpec]:
    """What the worker writes for the monitor: drift records, and the feature log when it is on."""
    monitor = settings.monitor
    topics = [TopicSpec(monitor.drift_topic, 1)]
    if monitor.feature_log:
        topics.append(TopicSpec(monitor.feature_log_topic, partitions))
    return topics


CONTROL_GROUP_PREFIX = "streamserve-control-"
"""Group ids of the workers' control-topic readers (never committed; see control/follower.py)."""
CLI_GROUP_PREFIX = "streamserve-cli-"
"""Group ids of `streamserve models` readers (see control/publish.py)."""


def _allow(
    principal: str,
    operation: AclOperation,
    resource: ResourceType,
    name: str,
    pattern: ResourcePatternType = ResourcePatternType.LITERAL,
) -> AclBinding:
    return AclBinding(resource, name, pattern, principal, "*", operation, AclPermissionType.ALLOW)


def worker_acls(settings: PipelineSettings, principal: str = "User:worker") -> list[AclBinding]:
    """What a worker needs and no more: read its input and the control topic, write its outputs, dead
    letters and status, use its consumer groups and (exactly-once) its transactional ids."""
    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    read, write = AclOperation.READ, AclOperation.WRITE
    prefixed = ResourcePatternType.PREFIXED
    return [
        _allow(principal, read, topic, settings.input.topic),
        _allow(principal, read, topic, settings.control.topic),
        *(
            _allow(principal, write, topic, name)
            for name in (
                settings.output.topic,
                settings.shadow_topic,
                settings.output.dead_letter_topic,
                settings.control.status_topic,
                *(spec.name for spec in monitor_topics(settings, 1)),
            )
        ),
        # The topics' max.message.bytes, read at start so no record is ever produced over the limit.
        *(
            _allow(principal, AclOperation.DESCRIBE_CONFIGS, topic, name)
            for name in (settings.output.topic, settings.shadow_topic, settings.output.dead_letter_topic)
        ),
        _allow(principal, read, group, settings.kafka.group_id),
        _allow(principal, read, group, CONTROL_GROUP_PREFIX, prefixed),
        # transactional.id is "<group_id>-<worker_id>" (app.py); WRITE implies DESCRIBE.
        _allow(principal, write, ResourceType.TRANSACTIONAL_ID, f"{settings.kafka.group_id}-", prefixed),
    ]


def publisher_acls(settings: PipelineSettings, principal: str = "User:publisher") -> list[AclBinding]:
    """What `streamserve models` needs: write (and read back) the control topic, read the status topic."""
    topic = settings.control.topic
    return [
        _allow(principal, AclOperation.WRITE, ResourceType.TOPIC, topic),
        _allow(principal, AclOperation.READ, ResourceType.TOPIC, topic),
        _allow(principal, AclOperation.READ, ResourceType.TOPIC, settings.control.status_topic),
        _allow(principal, AclOperation.READ, ResourceType.GROUP, CLI_GROUP_PREFIX, ResourcePatternType.PREFIXED),
    ]


def describe_acl(binding: AclBinding) -> str:
    """One line for people: ``User:worker ALLOW READ TOPIC transactions (LITERAL)``."""

    def name(value: object) -> str:
        return str(getattr(value, "name", value))

    return (
        f"{binding.principal} {name(binding.permission_type)} {name(binding.operation)} "
        f"{name(binding.restype)} {binding.name} ({name(binding.resource_pattern_type)})"
    )


def grant(client_config: LibrdkafkaConfig, bindings: list[AclBinding], timeout_s: float = 30.0) -> None:
    """Create ACL bindings (existing ones are left as they are); needs a principal allowed to ALTER the cluster."""
    admin = AdminClient(dict(client_config))
    futures = admin.create_acls(bindings, request_timeout=timeout_s)
    for binding, future in futures.items():
        future.result(timeout=timeout_s)
        log.info("granted %s", describe_acl(binding))
