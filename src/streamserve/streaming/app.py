"""The faust-streaming app of ``streamserve features stream``: input events in, windowed aggregates in Redis out.

One agent reads the input topic in steps of up to ``stream_features.max_batch_size`` events. A step decodes the
events (the worker's decoder), extracts each entity's contribution (streaming/extract.py), folds it into the
entity's state - a faust table whose changelog topic has the input's partition count, so a restarted app gets
its state back - writes every touched entity's current aggregates to Redis (streaming/store.py) and
dead-letters what it could not use. The step finishes before faust acknowledges its events, so an input offset
is committed only after the changelog (flushed by faust before each commit) and Redis hold its effect; an event
redelivered after a crash is recognised by its offset (EntityState.seen) and only its entity is written again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import faust
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from prometheus_client import REGISTRY

from streamserve.clients import faust_brokers, redis_client
from streamserve.config import PipelineSettings
from streamserve.errors import ConfigError
from streamserve.observe.metrics import HealthState, ObserveServer
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import load_schema, make_decoder
from streamserve.records import Event, Rejected, Source
from streamserve.streaming.extract import EntityGroup, Extractor, entity_groups
from streamserve.streaming.metrics import Counts, CountsCollector
from streamserve.streaming.store import AggregateStore, Entry
from streamserve.streaming.windows import EntityState

log = logging.getLogger(__name__)

STAGE = "aggregate"
"""The dead letters' stage header for events the aggregates could not use (``decode`` for undecodable ones)."""


class Aggregator:
    """One step over a batch of input records: decode, extract, fold into the table, write Redis, dead-letter."""

    def __init__(self, settings: PipelineSettings, table: Any, store: AggregateStore, producer: Producer) -> None:
        schema = load_schema(settings.input.schema_path)
        self.decoder = make_decoder(settings.input.schema_path, settings.kafka)
        self.groups: list[EntityGroup] = entity_groups(settings, schema)
        self.group_of = {name: group for group in self.groups for name in group.aggregates}
        self.extract = Extractor(self.groups, settings.input.event_time_field)
        self.table = table
        self.store = store
        self.producer = producer
        self.dead_letter_topic = settings.stream_features.dead_letter_topic or settings.output.dead_letter_topic
        self.retry_s = settings.redis.backoff_ms / 1000 or 0.1
        self.counts = Counts()

    async def step(self, sources: Sequence[Source]) -> None:
        """Fold a batch of records into the state and Redis; returns once Redis and the DLQ hold its effect."""
        events: list[Event] = []
        for source, decoded in zip(sources, self.decoder.decode_many([s.value for s in sources]), strict=True):
            if isinstance(decoded, Exception):
                self._dead_letter(Rejected.from_error(source, "decode", decoded), "undecodable")
            else:
                events.append(Event(source, decoded))
        extracted = self.extract(events)
        touched: dict[str, tuple[EntityGroup, EntityState]] = {}
        for contribution in extracted.contributions:
            group = self.group_of[next(iter(contribution.values))]
            key = contribution.key
            state = touched[key][1] if key in touched else EntityState.from_json(self.table.data.get(key))
            if state.apply(
                group.aggregates,
                contribution.partition,
                contribution.offset,
                contribution.time_ms,
                contribution.values,
            ):
                # The changelog partition is the event's: the entity's partition (it is keyed by the input's key).
                self.table.data[key] = document = state.to_json()
                self.table.send_changelog(contribution.partition, key, document)
            else:
                self.counts.redelivered += 1
            touched[key] = (group, state)
        for event, reasons in extracted.rejected:
            message = "; ".join(reasons)
            self._dead_letter(Rejected(event.source, STAGE, "AggregateError", message), None)
        for reason, count in extracted.reasons.items():
            self.counts.reasons[reason] = self.counts.reasons.get(reason, 0) + count
        await self._write(touched)
        self.producer.flush(30)
        self.counts.events += len(sources)

    async def _write(self, touched: dict[str, tuple[EntityGroup, EntityState]]) -> None:
        """Every touched entity's current aggregates, retried until Redis answers (the step waits)."""
        by_group: dict[str, tuple[EntityGroup, list[Entry]]] = {}
        for key, (group, state) in touched.items():
            if state.latest_ms is None:
                continue
            entry = Entry(key, state.latest_ms, state.applied, state.current(group.aggregates))
            by_group.setdefault(group.template, (group, []))[1].append(entry)
        batches = [(group.layout, group.indexes, entries) for group, entries in by_group.values()]
        if not batches:
            return
        attempt = 0
        while True:
            try:
                self.counts.refused += self.store.write(batches)
                self.counts.written += sum(len(entries) for _, _, entries in batches)
                return
            except redis.RedisError as exc:  # the feature store, never a record: the step waits for it
                attempt += 1
                self.counts.redis_errors += 1
                delay = min(self.retry_s * 2 ** min(attempt, 6), 5.0)
                log.warning("Redis write failed (%s), retry %d in %.1fs", exc, attempt, delay)
                await asyncio.sleep(delay)

    def _dead_letter(self, rejected: Rejected, reason: str | None) -> None:
        key, value, headers = dead_letter(rejected)
        self.producer.produce(self.dead_letter_topic, value=value, key=key, headers=headers)
        self.producer.poll(0)
        self.counts.dead_letters += 1
        if reason is not None:
            self.counts.reasons[reason] = self.counts.reasons.get(reason, 0) + 1


def _source(event: Any) -> Source:
    """The record of a faust event as the worker's steps take it."""
    message = event.message
    headers = message.headers
    if isinstance(headers, dict):
        headers = list(headers.items())
    return Source(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        list(headers) if headers else None,
        int(message.timestamp * 1000),
    )


def input_partitions(settings: PipelineSettings, timeout_s: float = 10.0) -> int:
    """The input topic's partition count (the changelog's must match); ConfigError when it does not exist."""
    admin = AdminClient(settings.kafka.common())
    topics = admin.list_topics(settings.input.topic, timeout=timeout_s).topics
    metadata = topics.get(settings.input.topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise ConfigError(
            f"input topic {settings.input.topic!r} not found on {settings.kafka.bootstrap_servers}: "
            "`streamserve topics create -c pipeline.yaml` creates it"
        )
    return len(metadata.partitions)


def build_app(settings: PipelineSettings, partitions: int) -> tuple[faust.App, Aggregator]:
    """The faust app: one table (changelog with ``partitions`` partitions), one agent, a progress timer."""
    sf = settings.stream_features
    if not sf.aggregates:
        raise ConfigError("stream_features.aggregates is empty: declare at least one aggregate in the pipeline YAML")
    brokers = faust_brokers(settings.kafka, "streamserve features stream")
    app = faust.App(
        sf.app_id,
        broker=brokers,
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=sf.commit_interval_s,
        topic_partitions=partitions,
        topic_replication_factor=sf.replication_factor,
        table_standby_replicas=0,
        broker_session_timeout=sf.session_timeout_s,
        broker_heartbeat_interval=min(3.0, sf.session_timeout_s / 3),
    )
    table = app.Table("aggregates", default=None, partitions=partitions, key_type=str)  # json keys and values
    client = redis_client(settings.redis)
    producer = Producer(settings.kafka.producer_config(linger_ms=5))
    aggregator = Aggregator(settings, table, AggregateStore(client, sf.updated_at_field), producer)
    topic = app.topic(settings.input.topic, key_type=bytes, value_type=bytes, value_serializer="raw")
    within = sf.max_wait_ms / 1000

    @app.agent(topic, name="aggregate")
    async def aggregate(stream: Any) -> None:
        async for batch in stream.take_events(sf.max_batch_size, within=within):
            await aggregator.step([_source(event) for event in batch])

    started = time.monotonic()

    async def progress() -> None:
        counts = aggregator.counts
        log.info(
            "features: %d events in %.0fs, %d entries written (%d refused as older), %d redelivered, "
            "%d dead letters %s",
            counts.events,
            time.monotonic() - started,
            counts.written,
            counts.refused,
            counts.redelivered,
            counts.dead_letters,
            counts.reasons or "",
        )

    if settings.log_every_s > 0:
        app.timer(settings.log_every_s)(progress)
    return app, aggregator


def run(settings: PipelineSettings, log_level: str = "info") -> None:
    """Run the app until SIGTERM/SIGINT (faust's worker handles the signals and the drain)."""
    partitions = input_partitions(settings)
    app, aggregator = build_app(settings, partitions)
    server = _serve_metrics(settings, app, aggregator.counts)
    log.info(
        "streaming features: %d aggregates from %s (%d partitions) into Redis %s; state in %s-aggregates-changelog",
        len(settings.stream_features.aggregates),
        settings.input.topic,
        partitions,
        settings.redis.url,
        settings.stream_features.app_id,
    )
    worker = faust.Worker(app, loglevel=log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        if server is not None:
            server.stop()


def _serve_metrics(settings: PipelineSettings, app: faust.App, counts: Counts) -> ObserveServer | None:
    """/metrics (the counts), /healthz and /readyz on ``stream_features.port``; None when it is unset."""
    sf = settings.stream_features
    if sf.port is None:
        return None
    REGISTRY.register(CountsCollector(counts))
    health = HealthState(settings.observe.liveness_timeout_s, lambda: True)
    health.beat()

    async def beat() -> None:
        health.beat()

    app.timer(5.0)(beat)
    server = ObserveServer(sf.host, sf.port, health)
    server.start()
    return server
