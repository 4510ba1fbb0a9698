"""What the worker records about each micro-batch: metrics, stage timings, the batch span, log context.

The telemetry is the observer the pipeline is built with: the processor's StageObserver (decode, enrich,
inference, encode, the whole processor run), the feature builder's LookupObserver (its Redis replies), the
delivery's DeliveryObserver and the registry's swap listener. Each stage adds two clock reads to a per-batch
:class:`StageClock`. After the batch, the clock becomes metrics (Redis and inference durations) and, when
tracing is on, child spans with their real start and end times. Per-record values (end-to-end latency,
feature age) and the batch duration go to numpy-bucketed histograms; the latency ones carry the sampled batch
span's trace id as an exemplar (one per batch).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import numpy as np

from streamserve.observe import context
from streamserve.observe.histogram import (
    AGE_SECONDS_BUCKETS,
    LATENCY_SECONDS_BUCKETS,
    BatchHistogram,
    BatchHistograms,
)
from streamserve.observe.metrics import BATCH_SECONDS_BUCKETS, WorkerMetrics
from streamserve.observe.tracing import BatchTracer
from streamserve.records import Rejected, Source


class StampedReplies(Protocol):
    """A key group's Redis reply as the telemetry reads it (features.Replies): its values and update stamps."""

    values: list[Any]

    def stamps(self, width: int, samples: int) -> list[float]: ...


class DesiredMode(Protocol):
    """A desired state as the swap metric reads it (control.rollout.DesiredState)."""

    @property
    def mode(self) -> str: ...


Requests = Sequence[tuple[Sequence[str] | None, Sequence[str]]]
"""(hash fields, keys) per key group (features.FeatureRequest)."""
LAG_INTERVAL_S = 1.0
MAX_AGE_SAMPLES = 64
"""Feature ages recorded per key group and batch (evenly spaced keys): freshness, not a census."""


@dataclass
class StageClock:
    """Start and end (ns) of each stage in one batch, and the durations the metrics want."""

    stages: dict[str, list[int]] = field(default_factory=dict)
    redis_s: list[float] = field(default_factory=list)
    inference_s: list[tuple[str, float]] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)
    """Open calls per stage: only the outermost call of a recursive stage (bisection) is measured."""
    opened: list[tuple[str, float]] = field(default_factory=lambda: [("batch", time.monotonic())])
    """The open stages, outermost first, with when each opened (monotonic): what the health probes read."""

    def mark(self, stage: str, start_ns: int, end_ns: int) -> None:
        span = self.stages.get(stage)
        if span is None:
            self.stages[stage] = [start_ns, end_ns]
        else:
            span[1] = end_ns


class Telemetry:
    """Per-batch metrics, log context and tracing for one worker."""

    def __init__(
        self,
        metrics: WorkerMetrics,
        tracer: BatchTracer | None,
        updated_at_fields: Iterable[str] = (),
        export: bool = False,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.updated_at_fields = set(updated_at_fields)
        self.latency = BatchHistogram(
            "streamserve_record_latency_seconds",
            "input record timestamp to output acknowledged, per record",
            LATENCY_SECONDS_BUCKETS,
        )
        self.feature_age = BatchHistogram(
            "streamserve_feature_age_seconds",
            "age of feature values read from Redis (now - updated_at), sampled per batch",
            AGE_SECONDS_BUCKETS,
            ["field"],
        )
        self.batch_duration = BatchHistogram(
            "streamserve_batch_duration_seconds", "decode to produce, per micro-batch", BATCH_SECONDS_BUCKETS
        )
        self.collector = BatchHistograms([self.latency, self.feature_age, self.batch_duration])
        self._registered = False
        if export:
            from prometheus_client import REGISTRY

            REGISTRY.register(self.collector)
            self._registered = True
        self.clock: StageClock | None = None
        self.lag: list[tuple[str, int, int]] = []
        """(topic, partition, records behind) of the assigned partitions, as last sampled."""
        self._next_lag_sample = 0.0
        self._unacknowledged: deque[tuple[Any, np.ndarray, str | None]] = deque()
        self._trace_id: str | None = None
        """The sampled batch span's trace id while a batch runs (the exemplar of its latencies), else None."""
        self._received_s: float | None = None
        """How long the next batch took to gather, from the first poll for it (its receive span), else None."""

    def close(self) -> None:
        """Stop exporting (and flush spans)."""
        if self._registered:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.collector)
            self._registered = False
        if self.tracer is not None:
            self.tracer.shutdown()

    # --- stage boundaries (StageObserver, LookupObserver) ---------------------------------------------------

    def current_stage(self) -> tuple[str, float] | None:
        """The innermost open stage of the batch in progress and since when (monotonic); None between batches."""
        clock = self.clock  # read from the probes' thread: one reference, one list slice, no lock needed
        opened = clock.opened[-1:] if clock is not None else []
        return opened[0] if opened else None

    def stage(self, name: str) -> AbstractContextManager[object]:
        """Marks the block as ``name`` of the current batch (the outermost of nested blocks only)."""
        clock = self.clock
        return _NOTHING if clock is None else _Stage(clock, name)

    def inference(self, model_version: str) -> AbstractContextManager[object]:
        """Marks the block as inference (the infer stage) and records its duration for the model version."""
        clock = self.clock
        return _NOTHING if clock is None else _Stage(clock, INFER, model_version)

    def replies_read(self, requests: Requests, replies: Sequence[StampedReplies], seconds: float) -> None:
        """A batch's Redis replies were read after ``seconds`` of waiting: the time, and the features' ages."""
        if self.clock is not None:
            self.clock.redis_s.append(seconds)
        else:
            self.metrics.redis_duration.record(seconds)
        if self.updated_at_fields:
            self._record_ages(requests, replies)

    def _record_ages(self, requests: Requests, replies: Sequence[StampedReplies]) -> None:
        now_ms = time.time() * 1000
        for (fields, _), reply in zip(requests, replies, strict=False):
            # The update stamp is the last field asked of each key (features.builder._KeyGroup.requested).
            if not fields or fields[-1] not in self.updated_at_fields or not reply.values:
                continue
            stamps = reply.stamps(len(fields), MAX_AGE_SAMPLES)
            if stamps:
                self.feature_age.observe((now_ms - np.asarray(stamps)) / 1000, [fields[-1]])

    # --- model swaps (the registry's swap listener, the follower's rejections) ------------------------------

    def swapped(self, desired: DesiredMode | None, routing: object) -> None:
        """A routing was switched in: an accepted swap, by mode ("config": the configured version)."""
        self.metrics.swaps.add(1, {"result": "accepted", "reason": desired.mode if desired else "config"})

    def drift_psi(self, model: str, version: str, feature: str, value: float) -> None:
        """One feature's (or the score's) PSI over the last drift window (pipeline/drift.py)."""
        self.metrics.psi[(model, version, feature)] = value

    def swap_rejected(self, kind: str) -> None:
        """The control plane rejected a desired state (announcement, unavailable, unservable)."""
        self.metrics.swaps.add(1, {"result": "rejected", "reason": kind})

    # --- one batch ---------------------------------------------------------------------------------------

    def received(self, waited_s: float) -> None:
        """The next batch is complete, `waited_s` after the first poll for it (the batch wait, the receive span)."""
        self.metrics.batch_wait.record(waited_s)
        self._received_s = waited_s

    @contextmanager
    def batch(self, sources: Sequence[Source], model_version: str) -> Iterator[BatchScope]:
        """Around one micro-batch: log context, stage clock, the batch span (when tracing)."""
        batch_context = context.BatchContext.of(context.next_batch_id(), sources, model_version)
        self.clock = StageClock()
        started_ns = time.time_ns()
        started = time.perf_counter_ns()
        scope = BatchScope(started_ns)
        received_s, self._received_s = self._received_s, None
        with context.batch_scope(batch_context):
            if self.tracer is None:
                try:
                    yield scope
                finally:
                    self.clock = None
                return
            receive = None if received_s is None else (started_ns - round(received_s * 1e9), started_ns)
            with self.tracer.batch_span(sources, batch_context, receive) as span:
                scope.traceparent = self.tracer.traceparent(span)
                span_context = span.get_span_context()
                self._trace_id = f"{span_context.trace_id:032x}" if span_context.trace_flags.sampled else None
                try:
                    yield scope
                finally:
                    self._trace_id = None
                    clock, self.clock = self.clock, None
                    processed = clock.stages.pop("process", None)
                    if processed is not None:  # what follows the processor is producing the outputs
                        clock.stages["produce"] = [processed[1], time.perf_counter_ns()]
                    self.tracer.stage_spans(span, clock, started_ns - started)

    def batch_done(
        self, sources: Sequence[Source], rejected: Sequence[Rejected], degraded: int, seconds: float
    ) -> None:
        """Counters and histograms of a processed batch."""
        m = self.metrics
        m.batches.add(1)
        m.batch_size.record(len(sources))
        self.batch_duration.observe((seconds,), trace_id=self._trace_id)
        m.events.add(len(sources) - len(rejected), {"outcome": "predicted"})
        stages: dict[str, int] = {}
        for item in rejected:
            stages[item.stage] = stages.get(item.stage, 0) + 1
        for stage, count in stages.items():
            m.events.add(count, {"outcome": "dead_letter", "stage": stage})
        if degraded:
            m.degraded.add(degraded)
        clock = self.clock
        if clock is not None:
            for seconds_ in clock.redis_s:
                m.redis_duration.record(seconds_)
            for version, seconds_ in clock.inference_s:
                m.inference_duration.record(seconds_, {"version": version})

    def defaults_used(self, missing: int, stale: int) -> None:
        """Feature defaults a batch used instead of missing or stale Redis values."""
        if missing:
            self.metrics.feature_defaults.add(missing, {"reason": "missing"})
        if stale:
            self.metrics.feature_defaults.add(stale, {"reason": "stale"})

    # --- end-to-end latency ------------------------------------------------------------------------------

    def sealed(self, inflight: Any, sources: Sequence[Source]) -> None:
        """A batch handed to the producer: its latency is recorded once all its outputs are acknowledged."""
        self._unacknowledged.append((inflight, _timestamps_ms(sources), self._trace_id))

    def sample_lag(self, read_lag: Callable[[], list[tuple[str, int, int]]]) -> None:
        """Refresh the consumer lag at most once per LAG_INTERVAL_S, from the loop's thread (the consumer is
        not safe to call from the metrics thread: its calls wait for the loop's consume())."""
        now = time.monotonic()
        if now >= self._next_lag_sample:
            self._next_lag_sample = now + LAG_INTERVAL_S
            self.lag = read_lag()

    def poll_acknowledged(self) -> None:
        """Record the latency of the batches acknowledged since the last call (in order, like commits)."""
        now_ms = time.time() * 1000
        while self._unacknowledged and self._unacknowledged[0][0].done:
            inflight, stamps, trace_id = self._unacknowledged.popleft()
            if inflight.error is None:
                self.latency.observe((now_ms - stamps) / 1000, trace_id=trace_id)

    def acknowledged(self, sources: Sequence[Source]) -> None:
        """A batch whose outputs are acknowledged now (exactly-once: its transaction committed)."""
        self.latency.observe((time.time() * 1000 - _timestamps_ms(sources)) / 1000, trace_id=self._trace_id)

    def transaction_aborted(self) -> None:
        """An exactly-once batch's transaction was aborted (the batch is read again)."""
        self.metrics.transactions_aborted.add(1)

    def producer_replaced(self) -> None:
        """The transactional producer failed and a new one took over: its batches will be measured again."""
        self.metrics.producer_replacements.add(1)
        self.forget_unacknowledged()

    def forget_unacknowledged(self) -> None:
        """The producer was replaced: its batches will be re-read and measured again."""
        self._unacknowledged.clear()


@dataclass
class BatchScope:
    """What the batch loop needs from the telemetry while it runs a batch."""

    started_ns: int
    traceparent: bytes | None = None
    """W3C traceparent of this batch's span, for the output records' headers (None when not tracing)."""


def _timestamps_ms(sources: Sequence[Source]) -> np.ndarray:
    return np.fromiter((s.timestamp_ms for s in sources), dtype=np.float64, count=len(sources))


def consumer_lag(consumer: Any) -> Callable[[], list[tuple[str, int, int]]]:
    """Per assigned partition: the partition's end offset (as last fetched) minus the consumer's position."""

    def lag() -> list[tuple[str, int, int]]:
        try:
            assigned = consumer.assignment()
            positions = consumer.position(assigned) if assigned else []
        except Exception:  # noqa: BLE001 - a closed or rebalancing consumer: no sample this scrape
            return []
        rows = []
        for tp in positions:
            try:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
            except Exception:  # noqa: BLE001 - unknown partition state: skip it this scrape
                continue
            if high >= 0 and tp.offset >= 0:
                rows.append((tp.topic, tp.partition, max(0, high - tp.offset)))
            elif high >= 0 and tp.offset < 0:  # nothing consumed yet: everything retained is behind
                rows.append((tp.topic, tp.partition, max(0, high - max(low, 0))))
        return rows

    return lag


INFER = "infer"
_NOTHING = nullcontext()


class _Stage:
    """One block of a stage on the batch's clock; nested blocks of the same stage (bisection) count once."""

    __slots__ = ("clock", "depth", "model_version", "name", "start")

    def __init__(self, clock: StageClock, name: str, model_version: str | None = None) -> None:
        self.clock, self.name, self.model_version = clock, name, model_version
        self.depth = 0
        self.start = 0

    def __enter__(self) -> None:
        depth = self.depth = self.clock.depth.get(self.name, 0)
        self.clock.depth[self.name] = depth + 1
        self.start = time.perf_counter_ns()
        if depth == 0:
            self.clock.opened.append((self.name, time.monotonic()))

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        clock = self.clock
        clock.depth[self.name] = self.depth
        end = time.perf_counter_ns()
        if self.depth == 0:
            clock.opened.pop()
            clock.mark(self.name, self.start, end)
            if self.model_version is not None:
                clock.inference_s.append((self.model_version, (end - self.start) / 1e9))
