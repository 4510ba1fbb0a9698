"""Follows the control topic from its beginning (outside the inference group) and reports status."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamserve.control.announcements import ModelAnnouncement, WorkerStatus
from streamserve.control.registry import ModelRegistry
from streamserve.errors import DecodeError, ModelError

log = logging.getLogger(__name__)

LibrdkafkaConfig = dict[str, str | int | float | bool]
_TRANSIENT = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


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


class ControlFollower:
    """Applies announcements for one model to a registry and publishes this worker's status."""

    def __init__(
        self,
        common_config: LibrdkafkaConfig,
        control_topic: str,
        status_topic: str,
        registry: ModelRegistry,
        worker_id: str,
        status_interval_s: float = 10.0,
    ) -> None:
        self.control_topic = control_topic
        self.status_topic = status_topic
        self.registry = registry
        self.worker_id = worker_id
        self.status_interval_s = status_interval_s
        self._consumer = Consumer(
            {
                **common_config,
                "group.id": f"streamserve-control-{uuid.uuid4()}",  # never committed: we always re-read
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 50,
            }
        )
        self._producer = Producer({**common_config, "linger.ms": 0})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_applied: ModelAnnouncement | None = None

    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Converge on the latest announced state before serving (synchronously)."""
        latest: dict[str, ModelAnnouncement] = {}

        def keep_latest(key: bytes | None, value: bytes | None) -> None:
            announcement = self._parse(value)
            if announcement is not None and announcement.model == self.registry.settings.name:
                latest[announcement.model] = announcement

        read_topic_to_end(self._consumer, self.control_topic, timeout_s, keep_latest)
        if self.registry.settings.name in latest:
            self._apply(latest[self.registry.settings.name])
        else:
            self.report()

    def start(self) -> None:
        """Follow new announcements in a background thread."""
        self._thread = threading.Thread(target=self._run, name="streamserve-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop following and close the clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._consumer.close()
        self._producer.flush(5)

    def _run(self) -> None:
        next_report = time.monotonic() + self.status_interval_s
        while not self._stop.is_set():
            try:
                messages = self._consumer.consume(num_messages=100, timeout=0.2)
            except KafkaException as exc:
                log.warning("control topic consumer: %s", exc)
                continue
            for msg in messages:
                if msg.error() is None:
                    announcement = self._parse(msg.value())
                    if announcement is not None and announcement.model == self.registry.settings.name:
                        self._apply(announcement)
            if time.monotonic() >= next_report:
                self.report()
                next_report = time.monotonic() + self.status_interval_s
            self._producer.poll(0)

    def _parse(self, value: bytes | None) -> ModelAnnouncement | None:
        if not value:
            return None
        try:
            return ModelAnnouncement.decode(value)
        except DecodeError as exc:
            log.error("ignoring an unreadable control record: %s", exc)
            return None

    def _apply(self, announcement: ModelAnnouncement) -> None:
        if announcement == self._last_applied:
            return
        self.report()  # loading
        try:
            self.registry.apply(announcement)
            self._last_applied = announcement
        except ModelError:
            pass  # the registry recorded the rejection; the current routing keeps serving
        self.report()

    def report(self) -> None:
        """Publish this worker's status for its model."""
        routing = self.registry.routing
        state = self.registry.status
        status = WorkerStatus(
            worker_id=self.worker_id,
            model=self.registry.settings.name,
            state=state.state,
            serving_version=routing.live.version,
            serving_uri=routing.live.uri,
            serving_sha256=routing.live.sha256,
            mode=routing.mode,
            candidate_version=routing.candidate.version if routing.candidate else None,
            canary_share=routing.canary_share,
            loading_version=state.loading_version,
            rejected_version=state.rejected_version,
            reason=state.reason,
            since=state.since_ms,
            reported_at=int(time.time() * 1000),
        )
        key = f"{self.worker_id}/{status.model}".encode()
        try:
            self._producer.produce(self.status_topic, status.encode(), key)
            self._producer.poll(0)
        except (BufferError, KafkaException) as exc:
            log.warning("status report not sent: %s", exc)
