"""Wiring and lifecycle of a worker: start order, the micro-batch loop, drain order."""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from streamserve.clients import redis_client
from streamserve.config import PipelineSettings
from streamserve.control.follower import ControlFollower
from streamserve.control.registry import ModelRegistry
from streamserve.errors import Fenced, RecordTooLarge
from streamserve.observe.context import set_worker
from streamserve.observe.metrics import HealthState, ObserveServer, WorkerMetrics
from streamserve.observe.telemetry import Telemetry, consumer_lag
from streamserve.observe.tracing import TRACEPARENT, BatchTracer
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import make_decoder
from streamserve.pipeline.delivery import delivery_for
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.enrich import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.sink import InflightBatch, OutputSink, size_limits
from streamserve.pipeline.source import KafkaSource
from streamserve.records import Rejected, Source
from streamserve.schema_registry import prediction_prefix

log = logging.getLogger(__name__)

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
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._paused = False
        self.drained = False
        """Set once the final batch was flushed and committed: what remains (closing clients) loses nothing."""
        event_schema = json.loads(settings.input.schema_path.read_text())
        check_event_schema(event_schema, settings)
        self._decode = make_decoder(settings.input.schema_path, settings.kafka)
        self.redis = redis_client(settings.redis)
        self.features = FeatureBuilder(
            settings.features, redis_fetcher(self.redis, settings.redis), event_schema=event_schema
        )
        self.registry = ModelRegistry(
            settings.model,
            settings.features,
            settings.control.keep_versions,
            settings.control.artifact_cache_dir.expanduser(),
        )
        self.encoder = PredictionEncoder(
            settings.output.schema_path,
            settings.input,
            settings.output.copy_fields,
            value_prefix=prediction_prefix(settings),  # b"" unless output.wire_format
            event_schema=event_schema,
        )
        self.processor = BatchProcessor(
            self._decode,
            self.features,
            self.encoder,
            settings.output.topic,
            settings.shadow_topic,
            settings.redis.on_error,
        )
        producer_options: dict[str, str | int | float | bool] = {}
        if settings.delivery == "exactly_once":
            # Stable per worker: a restarted worker with the same id fences its zombie predecessor.
            producer_options = {
                "transactional.id": f"{settings.kafka.group_id}-{self.worker_id}",
                "transaction.timeout.ms": settings.transaction_timeout_ms,
            }
        producer_config = settings.kafka.producer_config(**producer_options)
        # Known once at start, so every record's size is checked before it is produced (issue 10).
        limits = size_limits(
            producer_config,
            settings.kafka.common(),
            [settings.output.topic, settings.shadow_topic, settings.output.dead_letter_topic],
        )
        self.source = KafkaSource(settings.kafka.consumer_config(), settings.input.topic)
        self.batcher: MicroBatcher[Source] = MicroBatcher(settings.batch.max_batch_size, settings.batch.max_wait_ms)
        self.delivery = delivery_for(
            settings.delivery,
            self.source,
            self.batcher,
            lambda: OutputSink(producer_config, limits),
            settings.shutdown_timeout_s,
        )
        # control plane: not ready while the control-topic follower is down (it stops the worker, see _step)
        self.health = HealthState(
            settings.observe.liveness_timeout_s,
            ready=lambda: self.source.joined and (self.follower is None or self.follower.healthy()),
        )
        self.observe_server: ObserveServer | None = None
        readers: list[object] = []
        if settings.observe.port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            readers.append(PrometheusMetricReader())
            self.observe_server = ObserveServer(settings.observe.host, settings.observe.port, self.health)
        self.metrics = WorkerMetrics(
            self.worker_id,
            serving=lambda: (settings.model.name, self.registry.routing.live.version),
            inflight=lambda: self.delivery.sink.inflight,
            readers=readers,
            desired=lambda: self._desired_version,
            lag=lambda: self.telemetry.lag,
        )
        self._observe_batches(settings)
        self.follower = (
            ControlFollower(settings.kafka.common(), settings.control, self.registry, self.worker_id)
            if settings.control.enabled
            else None
        )
        if self.follower is not None:
            self.follower.on_rejected = lambda kind: self.metrics.swaps.add(1, {"result": "rejected", "reason": kind})

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
        p.decode_batch = t.timed("decode", p.decode_batch)  # type: ignore[method-assign]  # once per batch
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
        self.delivery.telemetry = self.telemetry
        realize = self.registry.realize

        def realize_and_count(desired: Any) -> Any:
            if desired is not None:
                self._desired_version = desired.version
            routing = realize(desired)  # a failure is counted by the follower's rejection, with its kind
            self.metrics.swaps.add(1, {"result": "accepted", "reason": desired.mode if desired else "config"})
            return routing

        self.registry.realize = realize_and_count  # type: ignore[method-assign]

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
        self.delivery.start()
        if self.follower is not None:
            self.follower.catch_up()
            self.follower.start()
        self.source.start(
            on_revoke=lambda partitions: self.delivery.revoked(partitions, self._observed), on_lost=self.delivery.lost
        )
        log.info(
            "worker %s serving %s %s from %s (%s)",
            self.worker_id,
            self.settings.model.name,
            self.registry.routing.live.version,
            self.settings.input.topic,
            self.settings.delivery,
        )
        # Everything built so far (clients, models, schemas) lives as long as the worker: out of the cyclic
        # collector's sight, so its full collections stop walking it (pauses of 65-150 ms every ~50k events).
        gc.collect()
        gc.freeze()
        next_log = time.monotonic() + self.settings.log_every_s
        try:
            while not self._stop.is_set():
                self._step()
                if self.settings.log_every_s and time.monotonic() >= next_log:
                    self._log_progress()
                    next_log = time.monotonic() + self.settings.log_every_s
            self.delivery.drain(self._observed, self.settings.shutdown_timeout_s)
            self.drained = True
            if self.follower is not None:  # control plane: a failed follower ends the worker non-zero
                self.follower.raise_if_failed()
        except Fenced as exc:
            # Another instance owns our transactional.id: stop without committing anything (no crash loop).
            self.stats.fenced = True
            log.error("fenced, stopping without committing: %s", exc)
        finally:
            if self.follower is not None:
                self.follower.stop()
            self.source.close()
            self.delivery.close()
            if self.observe_server is not None:
                self.observe_server.stop()
            self.telemetry.close()
            self.metrics.shutdown()
        self._log_progress()
        return self.stats

    def _step(self) -> None:
        self.health.beat()
        if self.follower is not None and not self.follower.healthy():  # control plane: drain, then fail
            log.error("the control-topic follower stopped or stalled: draining and exiting")
            self._stop.set()
        self._apply_backpressure()
        if not len(self.batcher):
            self.batcher.mark_open()  # the time bound counts from when we started waiting
        records = self.source.poll(self.batcher.room, self.batcher.time_left())
        self.batcher.add(records)
        if self.batcher.ready():
            self._observed(self.batcher.take())
        self.delivery.sink.poll(0)
        self.delivery.commit()
        self.telemetry.sample_lag(self._read_lag)

    def _apply_backpressure(self) -> None:
        """Wait while too many batches await acknowledgement; pause the partitions if that lasts.

        Prefetched input is already bounded by queued.max.messages.kbytes; pausing matters for a slow
        sink, so that waiting costs no memory and the consumer keeps serving group membership meanwhile.
        """
        limit = self.settings.batch.max_inflight_batches
        sink = self.delivery.sink
        if self._paused and sink.inflight <= limit // 2:
            self.source.resume()
            self._paused = False
        waiting_since = time.monotonic()
        while sink.inflight >= limit and not self._stop.is_set():
            sink.poll(0.05)
            self.delivery.commit()
            if not self._paused and time.monotonic() - waiting_since > PAUSE_AFTER_S:
                self.source.pause()
                self._paused = True
                self.stats.paused += 1
                self.metrics.pauses.add(1)
            if self._paused and self.batcher.room:
                self.batcher.add(self.source.poll(self.batcher.room, 0))  # serves rebalance callbacks

    def process(self, sources: list[Source]) -> None:
        """Run one micro-batch through decode -> enrich -> infer -> encode -> produce (-> commit)."""
        started = time.perf_counter()
        rejected = self.delivery.process(sources, self._run_batch)
        self.stats.aborted_batches = self.delivery.aborted_batches
        self.stats.producer_restarts = self.delivery.producer_restarts
        if rejected is None:
            return  # abandoned (an aborted transaction): read again
        self.stats.events_in += len(sources)
        self.stats.dead_letters += len(rejected)
        self.stats.batches += 1
        self.telemetry.batch_done(sources, rejected, self._degraded, time.perf_counter() - started)

    def _run_batch(self, sources: list[Source], inflight: InflightBatch, sink: OutputSink) -> list[Rejected]:
        """Process a batch and produce its outputs and dead letters (the delivery strategy wraps this)."""
        result = self.processor.run(sources, self.registry.routing)
        rejected = result.rejected
        for topic, record in result.outputs:
            try:
                sink.produce(inflight, topic, record.key, record.value, self._with_trace(record.headers))
            except RecordTooLarge as exc:
                if topic != self.settings.shadow_topic:  # a shadow output is dropped, its live one stands
                    rejected.append(Rejected.from_error(record.source, exc.stage, exc))
                    result.predictions -= 1
        for item in rejected:
            dlq_topic = self.settings.output.dead_letter_topic
            sink.produce(inflight, dlq_topic, *dead_letter(item, sink.max_record_bytes(dlq_topic)))
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
        return rejected

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
