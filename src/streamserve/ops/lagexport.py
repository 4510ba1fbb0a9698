"""Consumer lag measured at the broker, by a process other than the workers (`streamserve lag-exporter`).

A worker reports its own lag only while it runs and polls: a dead, frozen or blocked worker reports nothing or
a stale 0. This exporter reads, on every scrape, the group's committed offsets and the input topic's watermarks
through the Admin API and serves them for Prometheus:

``streamserve_broker_lag{group,topic,partition}``               end offset - committed offset (nothing committed:
                                                                 end - start, everything retained waits)
``streamserve_broker_committed_offset{group,topic,partition}``  the group's committed offset (when it has one)
``streamserve_broker_end_offset{topic,partition}``              the partition's high watermark
``streamserve_broker_group_members{group}``                     members of the consumer group

A scrape that cannot read the broker fails (HTTP 500): Prometheus records ``up == 0`` for the exporter rather
than a lag it did not measure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LibrdkafkaConfig = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class PartitionLag:
    """One partition of the input topic as the broker sees it for the group."""

    topic: str
    partition: int
    end: int
    committed: int | None
    lag: int


@dataclass(frozen=True)
class GroupLag:
    """The group's members and its lag per partition."""

    group: str
    members: int
    partitions: list[PartitionLag]


class BrokerLag:
    """Reads a group's committed offsets and a topic's watermarks through the Admin API."""

    def __init__(self, client_config: LibrdkafkaConfig, group: str, topic: str, timeout_s: float = 5.0) -> None:
        self.admin = AdminClient(dict(client_config))
        self.group, self.topic, self.timeout_s = group, topic, timeout_s

    def read(self) -> GroupLag:
        """The group's lag now; raises KafkaException (or a timeout) when the broker does not answer."""
        metadata = self.admin.list_topics(self.topic, timeout=self.timeout_s).topics[self.topic]
        if metadata.error is not None:
            raise RuntimeError(f"topic {self.topic}: {metadata.error}")
        partitions = [TopicPartition(self.topic, p) for p in sorted(metadata.partitions)]
        ends = self._offsets(partitions, OffsetSpec.latest())
        starts = self._offsets(partitions, OffsetSpec.earliest())
        request = [ConsumerGroupTopicPartitions(self.group, partitions)]
        answer = self.admin.list_consumer_group_offsets(request, request_timeout=self.timeout_s)[self.group]
        committed = {tp.partition: tp.offset for tp in answer.result(self.timeout_s).topic_partitions}
        described = self.admin.describe_consumer_groups([self.group], request_timeout=self.timeout_s)[self.group]
        members = len(described.result(self.timeout_s).members)
        rows = []
        for tp in partitions:
            end, offset = ends[tp.partition], committed.get(tp.partition, -1)
            behind = end - offset if offset >= 0 else end - starts[tp.partition]
            rows.append(PartitionLag(self.topic, tp.partition, end, offset if offset >= 0 else None, max(0, behind)))
        return GroupLag(self.group, members, rows)

    def _offsets(self, partitions: list[TopicPartition], spec: OffsetSpec) -> dict[int, int]:
        futures = self.admin.list_offsets({tp: spec for tp in partitions}, request_timeout=self.timeout_s)
        return {tp.partition: future.result(self.timeout_s).offset for tp, future in futures.items()}


class LagCollector(Collector):
    """Prometheus collector: one broker read per scrape."""

    def __init__(self, source: BrokerLag) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        """The lag metrics of one fresh read (an exception fails the scrape)."""
        state = self.source.read()
        lag = GaugeMetricFamily(
            "streamserve_broker_lag", "records behind, measured at the broker", labels=["group", "topic", "partition"]
        )
        committed = GaugeMetricFamily(
            "streamserve_broker_committed_offset",
            "the group's committed offset",
            labels=["group", "topic", "partition"],
        )
        end = GaugeMetricFamily("streamserve_broker_end_offset", "high watermark", labels=["topic", "partition"])
        for row in state.partitions:
            lag.add_metric([state.group, row.topic, str(row.partition)], row.lag)
            end.add_metric([row.topic, str(row.partition)], row.end)
            if row.committed is not None:
                committed.add_metric([state.group, row.topic, str(row.partition)], row.committed)
        members = GaugeMetricFamily(
            "streamserve_broker_group_members", "members of the consumer group", labels=["group"]
        )
        members.add_metric([state.group], state.members)
        yield from (lag, committed, end, members)
