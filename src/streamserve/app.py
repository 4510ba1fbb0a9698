"""Wiring and lifecycle of a worker: start order, the micro-batch loop, drain order."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from confluent_kafka import KafkaException, TopicPartition

from streamserve.config import PipelineSettings
from streamserve.control.follower import ControlFollower
from streamserve.control.registry import ModelRegistry
from streamserve.errors import Fenced, ModelError, ProducerFailed, RecordTooLarge, TransactionAborted
from streamserve.observe.context import set_worker
from streamserve.observe.metrics import HealthState, ObserveServer, WorkerMetrics
from streamserve.observe.telemetry import Telemetry, consumer_lag
from streamserve.observe.tracing import TRACEPARENT, BatchTracer
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import make_decoder
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.enrich import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.sink import InflightBatch, OutputSink, size_limits
from streamserve.pipeline.source import KafkaSource
from streamserve.records import Rejected, Source

log = logging.getLogger(__name__)

MAX_PRODUCER_RESTARTS = 10
"""Fatal producer errors tolerated within five minutes before the worker gives up."""
PAUSE_AFTER_S = 1.0
"""How long the sink may hold intake back before the partitions are paused."""


@dataclass
class WorkerStats:
    """Running totals of one worker, logged periodically."""

    events_in: int = 0
    predictions_out: int = 0
    shadow_out: int = 0
    dead_letters: int = 0
    batches: int = 0
    aborted_batches: int = 0
    degraded_predictions: int = 0
    missing_defaults: int = 0
    stale_defaults: int = 0
    paused: int = 0
    producer_restarts: int = 0
    fenced: bool = False
    by_stage: dict[str, int] = field(default_factory=dict)


class Worker:
    """One member of the inference consumer group."""

    def __init__(self, settings: PipelineSettings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        set_worker(self.worker_id)
        self.exactly_once = settings.delivery == "exactly_once"
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._paused = False
        self.drained = False
        """Set once the final batch was flushed and committed: what remains (closing clients) loses nothing."""
        check_event_schema(json.loads(settings.input.schema_path.read_text()), settings)
        self._decode = make_decoder(settings.input.schema_path, settings.kafka.schema_registry_url)
        timeout_s = settings.redis.timeout_ms / 1000
        self.redis = redis.Redis.from_url(
            settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.features = FeatureBuilder(settings.features, redis_fetcher(self.redis, settings.redis))
        self.registry = ModelRegistry(
            settings.model,
            settings.features,
            settings.control.keep_versions,
            settings.control.artifact_cache_dir.expanduser(),
        )
        self.encoder = PredictionEncoder(settings.output.schema_path, settings.input, settings.output.copy_fields)
        self.processor = BatchProcessor(
            self._decode,
            self.features,
            self.encoder,
            settings.output.topic,
            settings.shadow_topic,
            settings.redis.on_error,
        )
        producer_options: dict[str, str | int | float | bool] = {}
        if self.exactly_once:
            # Stable per worker: a restarted worker with the same id fences its zombie predecessor.
            producer_options = {
                "transactional.id": f"{settings.kafka.group_id}-{self.worker_id}",
                "transaction.timeout.ms": settings.transaction_timeout_ms,
            }
        self._producer_config = settings.kafka.producer_config(**producer_options)
        self._producer_restarts: list[float] = []
        # Known once at start, so every record's size is checked before it is produced (issue 10).
        self._size_limits = size_limits(
            self._producer_config,
            settings.kafka.common(),
            [settings.output.topic, settings.shadow_topic, settings.output.dead_letter_topic],
        )
        self.sink = OutputSink(self._producer_config, self._size_limits)
        self.source = KafkaSource(settings.kafka.consumer_config(), settings.input.topic)
        self.batcher: MicroBatcher[Source] = MicroBatcher(settings.batch.max_batch_size, settings.batch.max_wait_ms)
        self.health = HealthState(settings.observe.liveness_timeout_s, ready=lambda: self.source.joined)
        self.observe_server: ObserveServer | None = None
        readers: list[object] = []
        if settings.observe.port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(PrometheusMetricReader())
            self.observe_server = ObserveServer(settings.observe.host, settings.observe.port, self.health)
        self.metrics = WorkerMetrics(
            self.worker_id,
            serving=lambda: (settings.model.name, self.registry.routing.live.version),
            inflight=lambda: self.sink.inflight,
            readers=readers,
            desired=lambda: self._desired_version,
            lag=lambda: self.telemetry.lag,
        )
        self._observe_batches(settings)
        self.follower = (
            ControlFollower(
                settings.kafka.common(),
                settings.control.topic,
                settings.control.status_topic,
                self.registry,
                self.worker_id,
            )
            if settings.control.enabled
            else None
        )

    # --- observability (issue 14): everything the worker records, wired in one place ---------------------

    def _observe_batches(self, settings: PipelineSettings) -> None:
        """Metrics, log context and spans per batch: stage boundaries are marked by wrapping their callables."""
        updated_at = {spec.updated_at_field for spec in settings.features if spec.updated_at_field}
        self.telemetry = Telemetry(
            self.metrics,
            BatchTracer.from_settings(settings.observe, self.worker_id),
            updated_at,
            export=self.observe_server is not None,
        )
        t, p = self.telemetry, self.processor
        p.decode = t.timed("decode", p.decode)
        p.features.build = t.timed("enrich", p.features.build)  # type: ignore[method-assign]
        if p.features._fetch is not None:  # the Redis round trip inside enrich
            p.features._fetch = t.redis_fetcher(p.features._fetch)
        p._predict = t.timed("infer", p._predict)  # type: ignore[method-assign]
        p.encoder.encode = t.timed("encode", p.encoder.encode)  # type: ignore[method-assign]
        p.run = t.timed("process", p.run)  # type: ignore[method-assign]  # its end starts "produce"
        self._read_lag = consumer_lag(self.source.consumer)
        self._desired_version = settings.model.version
        self._traceparent: bytes | None = None
        self._degraded = 0
        apply = self.registry.apply

        def apply_and_count(announcement: Any) -> Any:
            self._desired_version = announcement.version
            try:
                routing = apply(announcement)
            except ModelError as exc:
                self.metrics.swaps.add(1, {"result": "rejected", "reason": type(exc).__name__})
                raise
            self.metrics.swaps.add(1, {"result": "accepted", "reason": announcement.action})
            return routing

        self.registry.apply = apply_and_count  # type: ignore[method-assign]

    def _observed(self, sources: list[Source]) -> None:
        """process() inside the batch's log context and span; outputs carry the span's traceparent."""
        with self.telemetry.batch(sources, self.registry.routing.live.version) as scope:
            self._traceparent = scope.traceparent
            self.process(sources)

    def _with_trace(self, headers: Any) -> Any:
        if self._traceparent is None:
            return headers
        return [*(h for h in headers or () if h[0] != TRACEPARENT), (TRACEPARENT, self._traceparent)]

    def stop(self) -> None:
        """Ask the loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self) -> WorkerStats:
        """Serve until stopped; on the way out finish the open batch, commit, and leave the group."""
        if self.observe_server is not None:
            self.observe_server.start()
        if self.exactly_once:
            self.sink.init_transactions(self.settings.shutdown_timeout_s)
        if self.follower is not None:
            self.follower.catch_up()
            self.follower.start()
        self.source.start(on_revoke=self._on_revoke, on_lost=self._on_lost)
        log.info(
            "worker %s serving %s %s from %s (%s)",
            self.worker_id,
            self.settings.model.name,
            self.registry.routing.live.version,
            self.settings.input.topic,
            self.settings.delivery,
        )
        next_log = time.monotonic() + self.settings.log_every_s
        try:
            while not self._stop.is_set():
                self._step()
                if self.settings.log_every_s and time.monotonic() >= next_log:
                    self._log_progress()
                    next_log = time.monotonic() + self.settings.log_every_s
            self._drain(self.settings.shutdown_timeout_s)
            self.drained = True
        except Fenced as exc:
            # Another instance owns our transactional.id: stop without committing anything (no crash loop).
            self.stats.fenced = True
            log.error("fenced, stopping without committing: %s", exc)
        finally:
            if self.follower is not None:
                self.follower.stop()
            self.source.close()
            if not self.exactly_once:
                self.sink.producer.flush(5)
            if self.observe_server is not None:
                self.observe_server.stop()
            self.telemetry.close()
            self.metrics.shutdown()
        self._log_progress()
        return self.stats

    def _step(self) -> None:
        self.health.beat()
        self._apply_backpressure()
        if not len(self.batcher):
            self.batcher.mark_open()  # the time bound counts from when we started waiting
        records = self.source.poll(self.batcher.room, self.batcher.time_left())
        self.batcher.add(records)
        if self.batcher.ready():
            self._observed(self.batcher.take())
        self.sink.poll(0)
        self._commit()

    def _apply_backpressure(self) -> None:
        """Wait while too many batches await acknowledgement; pause the partitions if that lasts.

        Prefetched input is already bounded by queued.max.messages.kbytes; pausing matters for a slow
        sink, so that waiting costs no memory and the consumer keeps serving group membership meanwhile.
        """
        limit = self.settings.batch.max_inflight_batches
        if self._paused and self.sink.inflight <= limit // 2:
            self.source.resume()
            self._paused = False
        waiting_since = time.monotonic()
        while self.sink.inflight >= limit and not self._stop.is_set():
            self.sink.poll(0.05)
            self._commit()
            if not self._paused and time.monotonic() - waiting_since > PAUSE_AFTER_S:
                self.source.pause()
                self._paused = True
                self.stats.paused += 1
                self.metrics.pauses.add(1)
            if self._paused and self.batcher.room:
                self.batcher.add(self.source.poll(self.batcher.room, 0))  # serves rebalance callbacks

    def _commit(self) -> None:
        self.telemetry.sample_lag(self._read_lag)
        if self.exactly_once:
            return  # offsets travel inside each batch's transaction
        self.telemetry.poll_acknowledged()
        self.source.release(self.sink.releasable())
        # Idle: whatever poll() handed out is processed and acknowledged, so its positions may be committed.
        self.source.commit(idle=not len(self.batcher) and not self.sink.inflight)

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.batcher) and time.monotonic() < deadline:
            self._observed(self.batcher.take())
        if self.exactly_once:
            self.batcher.take()  # past the deadline: abandoned uncommitted, the next owner re-reads it
            return
        self.source.release(self.sink.flush(max(deadline - time.monotonic(), 1.0)))
        # Also re-sends offsets whose earlier asynchronous commit failed (e.g. during a rebalance).
        self.source.commit(idle=not len(self.batcher) and not self.sink.inflight, asynchronous=False)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        if self.exactly_once:
            # No transaction is open between batches; records not yet processed are left to the next owner.
            self.batcher.drop(lambda s: (s.topic, s.partition) not in {(p.topic, p.partition) for p in partitions})
            return
        # Finish and commit what we hold before the partitions move, so the next owner starts after it.
        self._drain(self.settings.shutdown_timeout_s)

    def _on_lost(self, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: drop what we hold of them, commit nothing for them.
        lost = {(p.topic, p.partition) for p in partitions}
        self.batcher.drop(lambda s: (s.topic, s.partition) not in lost)

    def process(self, sources: list[Source]) -> None:
        """Run one micro-batch through decode -> enrich -> infer -> encode -> produce (-> commit)."""
        started = time.perf_counter()
        if not self.exactly_once:
            inflight, rejected = self._run_batch(sources)
            self.sink.seal(inflight)
            self.telemetry.sealed(inflight, sources)
        else:
            try:
                self.sink.begin()
                inflight, rejected = self._run_batch(sources)
                offsets = [TopicPartition(t, p, o) for (t, p), o in inflight.next_offsets.items()]
                self.sink.commit_transaction(
                    offsets, self.source.consumer.consumer_group_metadata(), self.settings.shutdown_timeout_s
                )
                self.telemetry.acknowledged(sources)
            except TransactionAborted:
                self.stats.aborted_batches += 1
                self.metrics.transactions_aborted.add(1)
                self._rewind(sources)
                return
            except (ProducerFailed, KafkaException) as exc:
                if isinstance(exc, KafkaException) and not exc.args[0].fatal():
                    raise
                self._replace_producer(exc, sources)
                return
        self.stats.events_in += len(sources)
        self.stats.dead_letters += len(rejected)
        self.stats.batches += 1
        self.telemetry.batch_done(sources, rejected, self._degraded, time.perf_counter() - started)

    def _run_batch(self, sources: list[Source]) -> tuple[InflightBatch, list[Rejected]]:
        inflight = InflightBatch()
        inflight.cover(sources)
        result = self.processor.run(sources, self.registry.routing)
        rejected = result.rejected
        for topic, record in result.outputs:
            try:
                self.sink.produce(inflight, topic, record.key, record.value, self._with_trace(record.headers))
            except RecordTooLarge as exc:
                if topic != self.settings.shadow_topic:  # a shadow output is dropped, its live one stands
                    rejected.append(Rejected.from_error(record.source, exc.stage, exc))
                    result.predictions -= 1
        for item in rejected:
            dlq_topic = self.settings.output.dead_letter_topic
            self.sink.produce(inflight, dlq_topic, *dead_letter(item, self.sink.max_record_bytes(dlq_topic)))
            self.stats.by_stage[item.stage] = self.stats.by_stage.get(item.stage, 0) + 1
        s = self.stats
        s.predictions_out += result.predictions
        s.shadow_out += result.shadow
        s.degraded_predictions += result.degraded
        self._degraded = result.degraded
        s.missing_defaults += result.missing_defaults
        s.stale_defaults += result.stale_defaults
        if result.missing_defaults:
            self.metrics.feature_defaults.add(result.missing_defaults, {"reason": "missing"})
        if result.stale_defaults:
            self.metrics.feature_defaults.add(result.stale_defaults, {"reason": "stale"})
        return inflight, rejected

    def _replace_producer(self, cause: Exception, sources: list[Source]) -> None:
        """A fatal, non-fencing producer error: a new producer with the same transactional.id takes over
        (aborting whatever the old one left open) and the input is re-read from the committed offsets."""
        now = time.monotonic()
        self._producer_restarts = [t for t in self._producer_restarts if now - t < 300] + [now]
        if len(self._producer_restarts) > MAX_PRODUCER_RESTARTS:
            raise ProducerFailed(f"{len(self._producer_restarts)} producer failures within 5 minutes, last: {cause}")
        log.warning("transactional producer failed (%s): replacing it, re-reading from committed offsets", cause)
        self.stats.producer_restarts += 1
        self.metrics.producer_replacements.add(1)
        self.sink = OutputSink(self._producer_config, self._size_limits)
        self.sink.init_transactions(self.settings.shutdown_timeout_s)
        self._rewind(sources)

    def _rewind(self, sources: list[Source]) -> None:
        """After an aborted transaction: forget buffered records and read again from the aborted batch's start.

        Each batch commits its offsets in its own transaction, so the first record of the aborted batch (or
        of the buffered ones) in each partition is exactly the committed position; seeking there needs no
        round trip to a group coordinator that may be the reason the transaction failed.
        """
        start: dict[tuple[str, int], int] = {}
        for source in [*sources, *self.batcher.drop(lambda _: False)]:
            tp = (source.topic, source.partition)
            start[tp] = min(source.offset, start.get(tp, source.offset))
        self.source.seek(start)

    def _log_progress(self) -> None:
        s = self.stats
        log.info(
            "events=%d predictions=%d dead_letters=%d batches=%d aborted=%d degraded=%d defaults(missing=%d "
            "stale=%d) version=%s",
            s.events_in,
            s.predictions_out,
            s.dead_letters,
            s.batches,
            s.aborted_batches,
            s.degraded_predictions,
            s.missing_defaults,
            s.stale_defaults,
            self.registry.routing.live.version,
        )
