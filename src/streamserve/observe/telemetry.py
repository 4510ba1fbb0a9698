"""What the worker records about each micro-batch: metrics, stage timings, the batch span, log context.

The pipeline stages stay free of observability code: :meth:`Telemetry.instrument` wraps the few callables
that mark stage boundaries (decode, feature building and its Redis fetch, inference, encoding, the whole
processor run), each wrapper adding two clock reads to a per-batch :class:`StageClock`. After the batch, the
clock becomes metrics (Redis and inference durations) and, when tracing is on, child spans with their real
start and end times. Per-record values (end-to-end latency, feature age) go to numpy-bucketed histograms.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from streamserve.observe import context
from streamserve.observe.histogram import (
    AGE_SECONDS_BUCKETS,
    LATENCY_SECONDS_BUCKETS,
    BatchHistogram,
    BatchHistograms,
)
from streamserve.observe.metrics import WorkerMetrics
from streamserve.observe.tracing import BatchTracer
from streamserve.records import Rejected, Source

F = TypeVar("F", bound=Callable[..., Any])
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
        self.collector = BatchHistograms([self.latency, self.feature_age])
        self._registered = False
        if export:
            from prometheus_client import REGISTRY

            REGISTRY.register(self.collector)
            self._registered = True
        self.clock: StageClock | None = None
        self.lag: list[tuple[str, int, int]] = []
        """(topic, partition, records behind) of the assigned partitions, as last sampled."""
        self._next_lag_sample = 0.0
        self._unacknowledged: deque[tuple[Any, np.ndarray]] = deque()

    def close(self) -> None:
        """Stop exporting (and flush spans)."""
        if self._registered:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.collector)
            self._registered = False
        if self.tracer is not None:
            self.tracer.shutdown()

    # --- stage boundaries ------------------------------------------------------------------------------

    def timed(self, stage: str, fn: F) -> F:
        """``fn`` with its calls marked as ``stage`` of the current batch (outermost call only)."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            clock = self.clock
            if clock is None:
                return fn(*args, **kwargs)
            depth = clock.depth.get(stage, 0)
            clock.depth[stage] = depth + 1
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                clock.depth[stage] = depth
                end = time.perf_counter_ns()
                if depth == 0:
                    clock.mark(stage, start, end)
                if stage == "infer" and depth == 0 and args:
                    clock.inference_s.append((str(getattr(args[0], "version", "")), (end - start) / 1e9))

        return wrapper  # type: ignore[return-value]

    def redis_fetcher(self, fetch: F) -> F:
        """The feature fetcher, timed per round trip and reading the ages of stamped features."""

        def wrapper(requests: Sequence[tuple[Sequence[str] | None, Sequence[str]]]) -> Any:
            return self._fetched(requests, lambda: fetch(requests))

        return wrapper  # type: ignore[return-value]

    def redis_starter(self, start: F) -> F:
        """The fetcher's start (a lookup sent ahead): its replies are timed and read as the fetcher's are; the
        time recorded is how long the batch waited for them once it needed them (the overlapped part is free)."""

        def wrapper(requests: Sequence[tuple[Sequence[str] | None, Sequence[str]]]) -> Any:
            return _ObservedPending(self, requests, start(requests))

        return wrapper  # type: ignore[return-value]

    def _fetched(self, requests: Sequence[tuple[Sequence[str] | None, Sequence[str]]], call: Callable[[], Any]) -> Any:
        """The replies ``call()`` reads for the requests, timed, their feature ages sampled."""
        start = time.perf_counter_ns()
        replies = call()
        elapsed = (time.perf_counter_ns() - start) / 1e9
        if self.clock is not None:
            self.clock.redis_s.append(elapsed)
        else:
            self.metrics.redis_duration.record(elapsed)
        if self.updated_at_fields:
            self._record_ages(requests, replies)
        return replies

    def _record_ages(self, requests: Sequence[tuple[Sequence[str] | None, Sequence[str]]], replies: Any) -> None:
        now_ms = time.time() * 1000
        for (fields, _), reply in zip(requests, replies, strict=False):
            if not fields or fields[-1] not in self.updated_at_fields or not reply.values:
                continue
            width = len(fields)  # the stamp is the last field asked of each key (enrich.Replies, keys x fields)
            per_key = reply.values[width - 1 :: width]
            stamps = []
            for key in range(0, len(per_key), max(1, len(per_key) // MAX_AGE_SAMPLES)):
                if per_key[key] is None or key in reply.errors:  # absent, or a key whose read failed
                    continue
                try:
                    stamps.append(float(per_key[key]))
                except (TypeError, ValueError):
                    continue
            if stamps:
                self.feature_age.observe((now_ms - np.asarray(stamps)) / 1000, [fields[-1]])

    # --- one batch ---------------------------------------------------------------------------------------

    @contextmanager
    def batch(self, sources: Sequence[Source], model_version: str) -> Iterator[BatchScope]:
        """Around one micro-batch: log context, stage clock, the batch span (when tracing)."""
        batch_context = context.BatchContext.of(context.next_batch_id(), sources, model_version)
        self.clock = StageClock()
        started_ns = time.time_ns()
        started = time.perf_counter_ns()
        scope = BatchScope(started_ns)
        with context.batch_scope(batch_context):
            if self.tracer is None:
                try:
                    yield scope
                finally:
                    self.clock = None
                return
            with self.tracer.batch_span(sources, batch_context) as span:
                scope.traceparent = self.tracer.traceparent(span)
                try:
                    yield scope
                finally:
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
        m.batch_duration.record(seconds)
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

    def instrument(self, processor: Any) -> None:
        """Mark the processor's stage boundaries (decode, enrich and its Redis round trip, infer, encode,
        the whole run): each wrapper adds two clock reads per batch, not per record."""
        p = processor
        p.decode_batch = self.timed("decode", p.decode_batch)
        p.features.build = self.timed("enrich", p.features.build)
        if p.features.fetch is not None:
            p.features.fetch = self.redis_fetcher(p.features.fetch)
        if p.features.start_fetch is not None:
            p.features.start_fetch = self.redis_starter(p.features.start_fetch)
        p.predict = self.timed("infer", p.predict)
        p.encoder.encode = self.timed("encode", p.encoder.encode)
        p.run = self.timed("process", p.run)  # its end starts "produce"

    # --- end-to-end latency ------------------------------------------------------------------------------

    def sealed(self, inflight: Any, sources: Sequence[Source]) -> None:
        """A batch handed to the producer: its latency is recorded once all its outputs are acknowledged."""
        self._unacknowledged.append((inflight, _timestamps_ms(sources)))

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
            inflight, stamps = self._unacknowledged.popleft()
            if inflight.error is None:
                self.latency.observe((now_ms - stamps) / 1000)

    def acknowledged(self, sources: Sequence[Source]) -> None:
        """A batch whose outputs are acknowledged now (exactly-once: its transaction committed)."""
        self.latency.observe((time.time() * 1000 - _timestamps_ms(sources)) / 1000)

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


class _ObservedPending:
    """A lookup sent ahead whose replies, once read, are timed and sampled as a fetch's (Telemetry.redis_starter)."""

    def __init__(self, telemetry: Telemetry, requests: Any, pending: Any) -> None:
        self._telemetry, self._requests, self._pending = telemetry, requests, pending

    def result(self) -> Any:
        return self._telemetry._fetched(self._requests, self._pending.result)

    def cancel(self) -> None:
        self._pending.cancel()

    @property
    def sent(self) -> bool:
        return bool(self._pending.sent)
