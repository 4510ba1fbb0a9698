"""Wiring and lifecycle of a worker: start order, the micro-batch loop, drain order."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import redis
from confluent_kafka import KafkaException, TopicPartition

from streamserve.config import PipelineSettings
from streamserve.control.follower import ControlFollower
from streamserve.control.registry import ModelRegistry, Routing
from streamserve.errors import DecodeError, EnrichError, Fenced, InferenceError, ProducerFailed, TransactionAborted
from streamserve.observe.metrics import HealthState, ObserveServer, WorkerMetrics
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.deadletter import dead_letter
from streamserve.pipeline.decode import make_decoder
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.enrich import FeatureBuilder, redis_fetcher
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.sink import InflightBatch, OutputSink
from streamserve.pipeline.source import KafkaSource
from streamserve.records import Event, FeatureBatch, Rejected, Source

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
        self.exactly_once = settings.delivery == "exactly_once"
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._paused = False
        self.drained = False
        """Set once the final batch was flushed and committed: what remains (closing clients) loses nothing."""
        self._decode = make_decoder(settings.input.schema_path, settings.kafka.schema_registry_url)
        timeout_s = settings.redis.timeout_ms / 1000
        self.redis = redis.Redis.from_url(
            settings.redis.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.features = FeatureBuilder(settings.features, redis_fetcher(self.redis, settings.redis))
        self.registry = ModelRegistry(
            settings.model,
            self.features.width,
            settings.control.keep_versions,
            settings.control.artifact_cache_dir.expanduser(),
        )
        self.encoder = PredictionEncoder(settings.output.schema_path, settings.input)
        producer_options: dict[str, str | int | float | bool] = {}
        if self.exactly_once:
            # Stable per worker: a restarted worker with the same id fences its zombie predecessor.
            producer_options = {
                "transactional.id": f"{settings.kafka.group_id}-{self.worker_id}",
                "transaction.timeout.ms": settings.transaction_timeout_ms,
            }
        self._producer_config = settings.kafka.producer_config(**producer_options)
        self._producer_restarts: list[float] = []
        self.sink = OutputSink(self._producer_config)
        self.source = KafkaSource(settings.kafka.consumer_config(), settings.input.topic)
        self.batcher: MicroBatcher[Source] = MicroBatcher(settings.batch.max_batch_size, settings.batch.max_wait_ms)
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
            inflight=lambda: self.sink.inflight,
            readers=readers,
        )
        self.follower = (
            ControlFollower(settings.kafka.common(), settings.control, self.registry, self.worker_id)
            if settings.control.enabled
            else None
        )

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
            if not self.exactly_once:
                self.sink.producer.flush(5)
            if self.observe_server is not None:
                self.observe_server.stop()
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
            self.process(self.batcher.take())
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
            if self._paused and self.batcher.room:
                self.batcher.add(self.source.poll(self.batcher.room, 0))  # serves rebalance callbacks

    def _commit(self) -> None:
        if self.exactly_once:
            return  # offsets travel inside each batch's transaction
        offsets = self.sink.releasable()
        if offsets:
            self.source.commit(offsets)

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.batcher) and time.monotonic() < deadline:
            self.process(self.batcher.take())
        if self.exactly_once:
            self.batcher.take()  # past the deadline: abandoned uncommitted, the next owner re-reads it
            return
        offsets = self.sink.flush(max(deadline - time.monotonic(), 1.0))
        if offsets:
            self.source.commit(offsets, asynchronous=False)

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
        else:
            try:
                self.sink.begin()
                inflight, rejected = self._run_batch(sources)
                offsets = [TopicPartition(t, p, o) for (t, p), o in inflight.next_offsets.items()]
                self.sink.commit_transaction(
                    offsets, self.source.consumer.consumer_group_metadata(), self.settings.shutdown_timeout_s
                )
            except TransactionAborted:
                self.stats.aborted_batches += 1
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
        self.metrics.batches.add(1)
        self.metrics.batch_size.record(len(sources))
        self.metrics.batch_duration.record(time.perf_counter() - started)
        self.metrics.events.add(len(sources) - len(rejected), {"outcome": "predicted"})
        for stage in {item.stage for item in rejected}:
            count = sum(item.stage == stage for item in rejected)
            self.metrics.events.add(count, {"outcome": "dead_letter", "stage": stage})

    def _run_batch(self, sources: list[Source]) -> tuple[InflightBatch, list[Rejected]]:
        inflight = InflightBatch()
        inflight.cover(sources)
        rejected: list[Rejected] = []
        events: list[Event] = []
        for source in sources:
            try:
                events.append(Event(source, self._decode(source.value)))
            except DecodeError as exc:
                rejected.append(Rejected(source, exc.stage, type(exc).__name__, str(exc)))
        if events:
            batch = self._features(events, rejected)
            if batch.events:
                self._score(batch, self.registry.routing, inflight, rejected)
        for item in rejected:
            self.sink.produce(inflight, self.settings.output.dead_letter_topic, *dead_letter(item))
            self.stats.by_stage[item.stage] = self.stats.by_stage.get(item.stage, 0) + 1
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
        self.sink = OutputSink(self._producer_config)
        self.sink.init_transactions(self.settings.shutdown_timeout_s)
        self._rewind(sources)

    def _features(self, events: list[Event], rejected: list[Rejected]) -> FeatureBatch:
        try:
            batch = self.features.build(events)
        except EnrichError as exc:
            policy = self.settings.redis.on_error
            if policy == "fail":
                raise
            if policy == "defaults":
                batch = self.features.build(events, redis_available=False)
            else:
                rejected += [Rejected(e.source, exc.stage, type(exc).__name__, str(exc)) for e in events]
                return FeatureBatch(events=[], matrix=np.empty((0, self.features.width), np.float32))
        rejected += batch.rejected
        self.stats.missing_defaults += batch.missing_defaults
        self.stats.stale_defaults += batch.stale_defaults
        if batch.missing_defaults:
            self.metrics.feature_defaults.add(batch.missing_defaults, {"reason": "missing"})
        if batch.stale_defaults:
            self.metrics.feature_defaults.add(batch.stale_defaults, {"reason": "stale"})
        return batch

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

    def _score(self, batch: FeatureBatch, routing: Routing, inflight: InflightBatch, rejected: list[Rejected]) -> None:
        topic = self.settings.output.topic
        if routing.mode == "canary" and routing.candidate is not None:
            keys = [str(event.fields[self.settings.input.key_field]) for event in batch.events]
            to_candidate = routing.canary_mask(keys)
            self._emit(batch, ~to_candidate, routing.live, topic, inflight, rejected)
            self._emit(batch, to_candidate, routing.candidate, topic, inflight, rejected)
        else:
            everything = np.ones(len(batch.events), dtype=bool)
            self._emit(batch, everything, routing.live, topic, inflight, rejected)
            if routing.mode == "shadow" and routing.candidate is not None:
                self._emit(batch, everything, routing.candidate, self.settings.shadow_topic, inflight, None)

    def _emit(
        self,
        batch: FeatureBatch,
        rows: np.ndarray,
        model: OnnxModel,
        topic: str,
        inflight: InflightBatch,
        rejected: list[Rejected] | None,
    ) -> None:
        """Score the selected rows with one model and produce them; rejected=None for shadow output."""
        if not rows.any():
            return
        index = np.flatnonzero(rows)
        events = [batch.events[i] for i in index]
        try:
            outputs = model.predict(batch.matrix[index])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises bare pybind errors; route, don't die
            if rejected is not None:
                rejected += [Rejected(e.source, InferenceError.stage, type(exc).__name__, str(exc)) for e in events]
            return
        finite = np.isfinite(outputs.score)
        if not finite.all():
            if rejected is not None:
                rejected += [
                    Rejected(
                        events[i].source,
                        InferenceError.stage,
                        InferenceError.__name__,
                        f"model {model.name} {model.version} returned a non-finite score",
                    )
                    for i in np.flatnonzero(~finite)
                ]
            keep = np.flatnonzero(finite)
            events = [events[i] for i in keep]
            outputs = type(outputs)(outputs.score[keep], None if outputs.label is None else outputs.label[keep])
        for key, value, headers in self.encoder.encode(events, outputs, model.name, model.version, batch.degraded):
            self.sink.produce(inflight, topic, key, value, headers)
        if rejected is None:
            self.stats.shadow_out += len(events)
        else:
            self.stats.predictions_out += len(events)
            self.stats.degraded_predictions += len(events) if batch.degraded else 0

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
