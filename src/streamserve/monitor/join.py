"""`streamserve monitor join`: the training-set join as a process (monitor/trainingset.py holds its logic).

It reads the feature-log and labels topics from their beginning (assigned, no consumer group, nothing committed:
the state is rebuilt by reading again, see trainingset.py) and writes examples to the compacted training-set
topic, keyed by event id, until stopped.
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from streamserve.config import PipelineSettings
from streamserve.errors import StreamServeError
from streamserve.monitor.trainingset import JoinCounts, TrainingJoin

log = logging.getLogger(__name__)


def partitions_of(consumer: Consumer, topics: list[str], timeout_s: float) -> list[TopicPartition]:
    """Every partition of the topics from the beginning; StreamServeError naming a topic that does not exist."""
    found = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise StreamServeError(f"topic {topic} does not exist (streamserve topics create -c creates it)")
        found += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
    return found


def run_join(
    settings: PipelineSettings, stop: threading.Event, max_pending: int = 100_000, log_every_s: float = 10.0
) -> JoinCounts:
    """Join until ``stop`` is set; returns the counts (examples, bad labels, duplicates...)."""
    monitor = settings.monitor
    join = TrainingJoin(monitor.feature_log_share, max_pending)
    consumer = Consumer(
        {**settings.kafka.common(), "group.id": "streamserve-training-join", "enable.auto.commit": False}
    )
    producer = Producer(settings.kafka.producer_config(enable_idempotence=True))
    failed: list[str] = []

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    try:
        consumer.assign(partitions_of(consumer, [monitor.feature_log_topic, settings.labels_topic], 30.0))
        next_log = time.monotonic() + log_every_s
        while not stop.is_set():
            for msg in consumer.consume(num_messages=500, timeout=0.2):
                if msg.error() is not None:
                    log.warning("training-set join: %s", msg.error())
                    continue
                offer = join.offer_log if msg.topic() == monitor.feature_log_topic else join.offer_label
                joined = offer(msg.value())
                if joined is not None:
                    producer.produce(monitor.training_set_topic, joined[1], joined[0], on_delivery=delivered)
            producer.poll(0)
            if failed:
                raise StreamServeError(f"training-set topic {monitor.training_set_topic}: {failed[0]}")
            if time.monotonic() >= next_log:
                log.info("training-set join: %s, %d waiting", join.counts, join.pending)
                next_log = time.monotonic() + log_every_s
    except KafkaException as exc:
        raise StreamServeError(f"training-set join: {exc}") from exc
    finally:
        producer.flush(30)
        consumer.close()
    return join.counts
