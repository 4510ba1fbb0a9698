"""A worker's lifecycle and its loop: start order, poll -> batch -> process -> deliver, drain order.

Everything is built (clients opened, schemas read, models loaded) by :func:`streamserve.wiring.build_worker`
and handed in; the worker owns no guarantee-specific logic (``Delivery``), no batch logic (``BatchProcessor``),
no output writing (``write_batch``) and no observability wiring (``Telemetry``). A batch goes one way:
the processor turns its records into a result, the delivery has the result written under its guarantee.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from confluent_kafka import TopicPartition

from streamserve.config import PipelineSettings
from streamserve.control.follower import ControlFollower
from streamserve.control.registry import ModelRegistry
from streamserve.errors import Fenced
from streamserve.observe.metrics import HealthState, ObserveServer, WorkerMetrics
from streamserve.observe.telemetry import Telemetry
from streamserve.pipeline.batch import MicroBatcher
from streamserve.pipeline.delivery import Delivery
from streamserve.pipeline.process import BatchProcessor, BatchResult
from streamserve.pipeline.sink import InflightBatch, OutputSink
from streamserve.pipeline.source import KafkaSource
from streamserve.pipeline.write import OutputTopics, write_batch
from streamserve.records import Rejected, Source

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
    batches_ahead: int = 0
    """Batches whose Redis lookup was sent ahead, while the batch before them was scored."""
    aborted_batches: int = 0
    degraded_predictions: int = 0
    missing_defaults: int = 0
    stale_defaults: int = 0
    paused: int = 0
    backpressure_s: float = 0.0
    """Time the loop waited for acknowledgements with a full in-flight window (0 on the normal path)."""
    max_batch_wait_s: float = 0.0
    """The longest a batch's first record waited in the worker before the batch was scored."""
    producer_restarts: int = 0
    fenced: bool = False
    by_stage: dict[str, int] = field(default_factory=dict)


@dataclass
class Worker:
    """One member of the inference consumer group: the parts build_worker() made, and the loop."""

    settings: PipelineSettings
    worker_id: str
    source: KafkaSource
    batcher: MicroBatcher[Source]
    delivery: Delivery
    processor: BatchProcessor
    registry: ModelRegistry
    follower: ControlFollower | None
    health: HealthState
    metrics: WorkerMetrics
    telemetry: Telemetry
    observe_server: ObserveServer | None
    read_lag: Callable[[], list[tuple[str, int, int]]]
    stats: WorkerStats = field(default_factory=WorkerStats)
    drained: bool = False
    """Set once the final batch was flushed and committed: what remains (closing clients) loses nothing."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _paused: bool = False
    _traceparent: bytes | None = None
    _topics: OutputTopics = field(init=False)

    def __post_init__(self) -> None:
        self._topics = OutputTopics(self.settings.shadow_topic, self.settings.output.dead_letter_topic)

    def stop(self) -> None:
        """Ask the loop to drain and exit (safe from signal handlers and other threads)."""
        self._stop.set()

    def run(self) -> WorkerStats:
        """Serve until stopped; on the way out finish the open batch, commit, and leave the group."""
        with ExitStack() as stack:  # closed in reverse: metrics, telemetry, server, producer, consumer, follower
            if self.follower is not None:
                stack.callback(self.follower.stop)
            stack.callback(self.source.close)
            stack.callback(self.delivery.close)
            if self.observe_server is not None:
                self.observe_server.start()
                stack.callback(self.observe_server.stop)
            stack.callback(self.telemetry.close)
            stack.callback(self.metrics.shutdown)
            self.delivery.start()
            if self.follower is not None:
                self.follower.catch_up()
                self.follower.start()
            self.source.start(on_revoke=self._revoked, on_lost=self.delivery.lost)
            s = self.settings
            log.info("worker %s serving %s %s from %s (%s)", self.worker_id, s.model.name, self._live, s.input.topic,
                     s.delivery)  # fmt: skip
            # What was built so far (clients, models, schemas) lives as long as the worker: out of the cyclic
            # collector's sight, so its full collections stop walking it (pauses of 65-150 ms every ~50k events).
            gc.collect()
            gc.freeze()
            try:
                self._loop()
            except Fenced as exc:
                # Another instance owns our transactional.id: stop without committing anything (no crash loop).
                self.stats.fenced = True
                self.health.failed(f"fenced: {exc}")
                log.error("fenced, stopping without committing: %s", exc)
        self._log_progress()
        return self.stats

    @property
    def _live(self) -> str:
        return self.registry.routing.live.version

    def _loop(self) -> None:
        next_log = time.monotonic() + self.settings.log_every_s
        while not self._stop.is_set():
            self._step()
            if self.settings.log_every_s and time.monotonic() >= next_log:
                self._log_progress()
                next_log = time.monotonic() + self.settings.log_every_s
        self.delivery.drain(self._observed, self.settings.shutdown_timeout_s)
        self.processor.drop_prefetched()
        self.drained = True
        if self.follower is not None:  # control plane: a failed follower ends the worker non-zero
            self.follower.raise_if_failed()

    def _step(self) -> None:
        """One turn of the loop: heartbeat, control plane, backpressure, the next batch, acknowledgements, commit."""
        self.health.beat()
        self._check_control_plane()
        if self.delivery.inflight >= self.settings.batch.max_inflight_batches or self._paused:
            self._apply_backpressure()
        batch = self._next_batch()
        if batch is not None:
            self._observed(batch)
        self.delivery.poll(0)
        self.delivery.commit()
        self.telemetry.sample_lag(self.read_lag)

    def _check_control_plane(self) -> None:
        """A failed or stalled control-topic follower stops the worker (after draining)."""
        if self.follower is not None and not self.follower.healthy():
            log.error("the control-topic follower stopped or stalled: draining and exiting")
            self._stop.set()

    def _next_batch(self) -> list[Source] | None:
        """Poll until the open batch is ready or its time bound is up; the batch, once ready (the full batch
        behind it, if one is held, gets its Redis lookup sent ahead)."""
        if not len(self.batcher):
            # The batch's clock starts when we begin waiting, so its first record waits at most max_wait_ms.
            self.batcher.mark_open()
            self.processor.drop_prefetched()  # nothing held: what was prepared ahead (a rewind) can never run
        wait_s = 0.0 if self.batcher.ready() else self.batcher.time_left()  # a batch held ahead is ready at once
        self.batcher.add(self.source.poll(self.batcher.room, wait_s))
        if self.batcher.ready() and self.batcher.room:  # what is fetched already, without waiting: the batch ahead
            self.batcher.add(self.source.poll(self.batcher.room, 0))
        if not self.batcher.ready():  # again: a rebalance served by that poll may have taken the records
            return None
        waited = self.batcher.age()
        self.stats.max_batch_wait_s = max(self.stats.max_batch_wait_s, waited)
        self.telemetry.received(waited)
        batch = self.batcher.take()
        following = self.batcher.peek()
        if following is not None:  # a full batch waits behind: its Redis lookup overlaps this batch's work
            self.processor.prefetch(following)
        return batch

    def _apply_backpressure(self) -> None:
        """Wait while too many batches await acknowledgement; pause the partitions if that lasts.

        Off the normal path (the in-flight window is sized so a healthy broker never fills it); what it
        costs is counted (stats.backpressure_s, the pauses metric). Prefetched input is bounded by
        queued.max.messages.kbytes; pausing keeps group membership served without buffering more.
        """
        limit, delivery = self.settings.batch.max_inflight_batches, self.delivery
        if self._paused and delivery.inflight <= limit // 2:
            self.source.resume()
            self._paused = False
        waiting_since = time.monotonic()
        while delivery.inflight >= limit and not self._stop.is_set():
            delivery.poll(0.05)
            delivery.commit()
            if not self._paused and time.monotonic() - waiting_since > PAUSE_AFTER_S:
                self.source.pause()
                self._paused = True
                self.stats.paused += 1
                self.metrics.pauses.add(1)
            if self._paused and self.batcher.room:
                self.batcher.add(self.source.poll(self.batcher.room, 0))  # serves rebalance callbacks
        waited = time.monotonic() - waiting_since
        self.stats.backpressure_s += waited
        self.metrics.backpressure.add(waited)

    def _revoked(self, partitions: list[TopicPartition]) -> None:
        """The group takes partitions away: the delivery settles what we hold of them (processing it or not)."""
        self.delivery.revoked(partitions, self._observed)

    def _observed(self, sources: list[Source]) -> None:
        """process() inside the batch's log context and span; outputs carry the span's traceparent."""
        with self.telemetry.batch(sources, self._live) as scope:
            self._traceparent = scope.traceparent
            self.process(sources)

    def process(self, sources: list[Source]) -> None:
        """Run one micro-batch through decode -> enrich -> infer -> encode, then deliver it (produce -> commit)."""
        started = time.perf_counter()
        result = self.processor.run(sources, self.registry.routing)
        topics, traceparent = self._topics, self._traceparent

        def write(_: list[Source], inflight: InflightBatch, sink: OutputSink) -> list[Rejected]:
            return write_batch(result, sink, inflight, topics, traceparent)

        rejected = self.delivery.process(sources, write)
        self._tally(result)
        self.stats.aborted_batches = self.delivery.aborted_batches
        self.stats.producer_restarts = self.delivery.producer_restarts
        if rejected is None:
            return  # abandoned (an aborted transaction): read again
        self.stats.events_in += len(sources)
        self.stats.dead_letters += len(rejected)
        self.stats.batches += 1
        self.health.batch_written()
        self.stats.batches_ahead = self.processor.used_ahead
        self.telemetry.batch_done(sources, rejected, result.degraded, time.perf_counter() - started)

    def _tally(self, result: BatchResult) -> None:
        """The running totals of a written batch (its rejected records include those the sink refused)."""
        s = self.stats
        for item in result.rejected:
            s.by_stage[item.stage] = s.by_stage.get(item.stage, 0) + 1
        s.predictions_out += result.predictions
        s.shadow_out += result.shadow
        s.degraded_predictions += result.degraded
        s.missing_defaults += result.missing_defaults
        s.stale_defaults += result.stale_defaults
        self.telemetry.defaults_used(result.missing_defaults, result.stale_defaults)

    def _log_progress(self) -> None:
        s = self.stats
        log.info(
            "events=%d predictions=%d dead_letters=%d batches=%d aborted=%d degraded=%d defaults(missing=%d "
            "stale=%d) paused=%d backpressure_s=%.2f max_batch_wait_ms=%.1f batches_ahead=%d model=%s version=%s "
            "partitions=%s",
            *(s.events_in, s.predictions_out, s.dead_letters, s.batches, s.aborted_batches, s.degraded_predictions),
            *(s.missing_defaults, s.stale_defaults, s.paused, s.backpressure_s, s.max_batch_wait_s * 1000),
            *(s.batches_ahead, self.settings.model.name, self._live, self._partitions()),
        )

    def _partitions(self) -> str:
        """The partitions this member owns now, e.g. ``transactions[0,3]`` (``-`` while it owns none)."""
        owned: dict[str, list[int]] = {}
        for topic, partition in sorted(self.source.assignment):
            owned.setdefault(topic, []).append(partition)
        return " ".join(f"{t}[{','.join(map(str, ps))}]" for t, ps in owned.items()) or "-"
