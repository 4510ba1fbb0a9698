"""Reading the control plane's topics, shared by the workers' follower and the operator's commands.

Both sides replay the same records through the same policy (rollout.py), so the publisher computes the next
generation from exactly the announcements the workers accepted: a record that does not verify is reported and
otherwise ignored everywhere.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from streamserve.config import ControlSettings
from streamserve.control.announcements import ModelAnnouncement, WorkerStatus
from streamserve.control.rollout import AcceptancePolicy, Rejection, RolloutState
from streamserve.control.signing import TrustedKeys
from streamserve.errors import DecodeError

LibrdkafkaConfig = dict[str, str | int | float | bool]
_TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


def acceptance_policy(settings: ControlSettings, model: str, also_trust: TrustedKeys | None = None) -> AcceptancePolicy:
    """The policy the settings describe: signatures required as soon as a key is trusted (unless set)."""
    trusted = TrustedKeys.load(settings.trusted_keys, settings.trusted_keys_file)
    if also_trust is not None:
        trusted = TrustedKeys({**trusted.keys, **also_trust.keys})
    required = bool(trusted) if settings.require_signatures is None else settings.require_signatures
    return AcceptancePolicy(
        model,
        trusted,
        required,
        frozenset(s.lower() for s in settings.allowed_uri_schemes),
        settings.max_generation_step,
    )


def read_topic_to_end(
    consumer: Consumer, topic: str, timeout_s: float, on_record: Callable[[bytes | None, bytes | None], None]
) -> None:
    """Assign every partition of a topic from the beginning and read up to the current end."""
    metadata = consumer.list_topics(topic, timeout=timeout_s)
    partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
    if not partitions or metadata.topics[topic].error is not None:
        consumer.assign([])
        return
    deadline = time.monotonic() + timeout_s
    ends = {
        partition: _high_watermark(consumer, TopicPartition(topic, partition), deadline) for partition in partitions
    }
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    positions = dict.fromkeys(partitions, 0)
    while any(positions[p] < ends[p] for p in partitions):
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not read {topic} to its end within {timeout_s:.0f}s")
        for msg in consumer.consume(num_messages=500, timeout=0.2):
            if msg.error() is not None:
                continue
            positions[msg.partition()] = (msg.offset() or 0) + 1
            on_record(msg.key(), msg.value())


def _high_watermark(consumer: Consumer, partition: TopicPartition, deadline: float) -> int:
    """The partition's end offset, retrying while a new topic's leader is being elected."""
    while True:
        try:
            return int(consumer.get_watermark_offsets(partition, timeout=5)[1])
        except KafkaException as exc:
            # A topic created a moment ago answers NOT_LEADER_FOR_PARTITION (not flagged retriable) at first.
            if exc.args[0].code() not in _TRANSIENT or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _reader(config: LibrdkafkaConfig) -> Consumer:
    return Consumer({**config, "group.id": f"streamserve-cli-{uuid.uuid4()}", "enable.auto.commit": False})


def read_keyed_records(
    config: LibrdkafkaConfig, topic: str, timeout_s: float = 20.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Every (key, value) still on a topic, in topic order (per partition)."""
    consumer = _reader(config)
    found: list[tuple[bytes | None, bytes | None]] = []
    try:
        read_topic_to_end(consumer, topic, timeout_s, lambda key, value: found.append((key, value)))
    finally:
        consumer.close()
    return found


def read_records(config: LibrdkafkaConfig, topic: str, timeout_s: float = 20.0) -> list[bytes | None]:
    """Every record value still on the control topic, in topic order."""
    return [value for _, value in read_keyed_records(config, topic, timeout_s)]


@dataclass(frozen=True)
class ControlLog:
    """One model's control topic as every worker reads it: the state, what was accepted, what was refused."""

    state: RolloutState = field(default_factory=RolloutState)
    accepted: tuple[ModelAnnouncement, ...] = ()
    """Accepted announcements, oldest first."""
    rejected: tuple[Rejection, ...] = ()
    """Records of this model (or undecodable ones) that did not verify: reported, never counted."""

    @classmethod
    def replay(cls, records: Iterable[bytes | None], policy: AcceptancePolicy) -> ControlLog:
        """Run the records through the rollout state machine, exactly as the workers do."""
        state = RolloutState()
        accepted: list[ModelAnnouncement] = []
        rejected: list[Rejection] = []
        for value in records:
            if not value:
                continue
            try:
                announcement = ModelAnnouncement.decode(value)
            except DecodeError as exc:
                rejected.append(Rejection(str(exc)))
                continue
            if announcement.model != policy.model:
                continue
            state, rejection = state.offer(announcement, policy)
            if rejection is None:
                accepted.append(announcement)
            else:
                rejected.append(rejection)
        return cls(state, tuple(accepted), tuple(rejected))


def latest_statuses(records: Iterable[tuple[bytes | None, bytes | None]]) -> tuple[list[WorkerStatus], int]:
    """The latest status per worker and model (sorted), and how many records were not readable statuses."""
    latest: dict[bytes, WorkerStatus] = {}
    unreadable = 0
    for key, value in records:
        if key is None or not value:
            continue
        try:
            latest[key] = WorkerStatus.decode(value)
        except DecodeError:
            unreadable += 1
    return sorted(latest.values(), key=lambda s: (s.model, s.worker_id)), unreadable
