"""`streamserve backtest`: score a range of the input topic's history with a candidate version and the live one.

Each partition range is read by its own reader outside the consumer group (ops/history.py: assigned, never
committed) and scored by the worker's own BatchProcessor in shadow mode, so both versions score every batch
from the very same feature columns: the live version's outputs come out of the live lane, the candidate's out of
the shadow lane. With ``jobs`` > 1 the ranges are scored in that many processes, each loading both versions once.
Features are read from Redis as they are now, not as they were when the events happened: the report says so.
The comparison itself (agreement, flips, deltas, latency, quality) is ops/comparison.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from streamserve.config import PipelineSettings
from streamserve.control.rollout import ArtifactRef
from streamserve.errors import StreamServeError
from streamserve.observe.progress import Progress
from streamserve.ops.comparison import (
    LATENCY_QUANTILES,
    agreement,
    decode_labels,
    quality,
    quantiles,
    score_deltas,
)
from streamserve.ops.history import PartitionRange, Position, read_range, reader, resolve_range
from streamserve.pipeline.encode import EncodedBatch, decode_prediction
from streamserve.pipeline.process import BatchResult
from streamserve.pipeline.routing import Routing
from streamserve.pipeline.subjects import prediction_prefix
from streamserve.scoring import build_processor, load_model, resolve_versions

log = logging.getLogger(__name__)

LIVE_LANE = "live"
CANDIDATE_LANE = "candidate"
"""The processor's output and shadow topic names in a backtest: they only tell the two lanes apart."""


@dataclass
class Scored:
    """What scoring some partition ranges gave, as columns (row i: one event both versions scored)."""

    partition: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    event_id: list[str | None] = field(default_factory=list)
    live_score: list[float] = field(default_factory=list)
    live_label: list[str | None] = field(default_factory=list)
    candidate_score: list[float] = field(default_factory=list)
    candidate_label: list[str | None] = field(default_factory=list)
    events: int = 0
    """Records read."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Records the live version's path rejected, by ``stage: reason``."""
    live_only: int = 0
    """Events the live version scored and the candidate did not."""
    batch_ms: list[float] = field(default_factory=list)
    live_ms: list[float] = field(default_factory=list)
    candidate_ms: list[float] = field(default_factory=list)

    def extend(self, other: Scored) -> None:
        """Append another job's results."""
        for name in ("partition", "offset", "event_id", "live_score", "live_label", "candidate_score",
                     "candidate_label", "batch_ms", "live_ms", "candidate_ms"):  # fmt: skip
            getattr(self, name).extend(getattr(other, name))
        self.events += other.events
        self.live_only += other.live_only
        for reason, count in other.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count


class _InferenceTimes:
    """The processor's StageObserver: how long each version's inference took in the current batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Stages are not timed here (the whole batch is)."""
        yield

    @contextmanager
    def inference(self, model_version: str) -> Iterator[None]:
        """Time one model's scoring of a lane."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[model_version] = self.seconds.get(model_version, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class Job:
    """What every scoring process needs: the settings, both versions, where the candidate's predictions go."""

    settings: PipelineSettings
    live: ArtifactRef
    candidate: ArtifactRef
    batch_size: int = 1000
    predictions_topic: str | None = None
    timeout_s: float = 30.0


class _Scorer:
    """One process's models and processor, loaded once and used for every range it is given."""

    def __init__(self, job: Job) -> None:
        self.job = job
        live = load_model(job.settings, job.live)
        candidate = load_model(job.settings, job.candidate)
        self.routing = Routing(live=live, mode="shadow", candidate=candidate)
        self.times = _InferenceTimes()
        lanes = job.settings.output.model_copy(update={"topic": LIVE_LANE, "shadow_topic": CANDIDATE_LANE})
        settings = job.settings.model_copy(update={"output": lanes})
        self.processor = build_processor(settings, observer=self.times)
        self.schema = self.processor.encoder.schema
        self.producer = (
            Producer(job.settings.kafka.producer_config(linger_ms=20)) if job.predictions_topic is not None else None
        )
        self.prefix = b""
        """Before each prediction written to the topic: the wire format's (output.wire_format), as the worker's."""
        if job.predictions_topic is not None:
            output = job.settings.output.model_copy(update={"topic": job.predictions_topic})
            self.prefix = prediction_prefix(job.settings.model_copy(update={"output": output}))

    def score(self, partition_range: PartitionRange, on_scored: Callable[[int], None] | None = None) -> Scored:
        """Read one partition range and score it with both versions (``on_scored``: told of each batch's size)."""
        scored = Scored()
        settings = self.job.settings
        consumer = reader(settings.kafka.common(), "backtest")
        try:
            for batch in read_range(
                consumer, settings.input.topic, [partition_range], self.job.batch_size, self.job.timeout_s
            ):
                self.times.seconds.clear()
                started = time.perf_counter()
                result = self.processor.run(batch, self.routing)
                scored.batch_ms.append((time.perf_counter() - started) * 1000)
                scored.live_ms.append(self.times.seconds.get(self.routing.live.version, 0.0) * 1000)
                candidate_version = self.routing.candidate.version if self.routing.candidate else ""
                scored.candidate_ms.append(self.times.seconds.get(candidate_version, 0.0) * 1000)
                scored.events += len(batch)
                self._collect(result, scored)
                if on_scored is not None:
                    on_scored(len(batch))
                log.debug("partition %d: %d of %d read", partition_range.partition, scored.events, partition_range.size)
        finally:
            consumer.close()
        if self.producer is not None:
            self.producer.flush(self.job.timeout_s)
        return scored

    def _collect(self, result: BatchResult, scored: Scored) -> None:
        """Join the two lanes' predictions by source offset; count the live path's rejections."""
        live: dict[tuple[int, int], dict[str, Any]] = {}
        candidate: dict[tuple[int, int], dict[str, Any]] = {}
        for topic, encoded in result.outputs:
            into = live if topic == LIVE_LANE else candidate
            for record in encoded:
                into[(record.source.partition, record.source.offset)] = decode_prediction(self.schema, record.value)
            if topic == CANDIDATE_LANE and self.producer is not None and self.job.predictions_topic:
                self._produce(self.job.predictions_topic, encoded)
        for rejected in result.rejected:
            reason = f"{rejected.stage}: {rejected.error_class}"
            scored.rejected[reason] = scored.rejected.get(reason, 0) + 1
        for position, prediction in live.items():
            other = candidate.get(position)
            if other is None:
                scored.live_only += 1
                continue
            scored.partition.append(position[0])
            scored.offset.append(position[1])
            scored.event_id.append(_text(prediction.get("event_id")))
            scored.live_score.append(float(prediction["score"]))
            scored.live_label.append(label_of(prediction))
            scored.candidate_score.append(float(other["score"]))
            scored.candidate_label.append(label_of(other))

    def _produce(self, topic: str, encoded: EncodedBatch) -> None:
        assert self.producer is not None
        for record in encoded:
            while True:
                try:
                    self.producer.produce(topic, self.prefix + record.value, record.key, headers=record.headers)
                    break
                except BufferError:
                    self.producer.poll(0.1)
        self.producer.poll(0)


def label_of(prediction: dict[str, Any]) -> str | None:
    """The predicted class as text (string or integer labels); None for regressors."""
    if prediction.get("predicted_class") is not None:
        return str(prediction["predicted_class"])
    if prediction.get("label") is not None:
        return str(prediction["label"])
    return None


def _text(value: object) -> str | None:
    return None if value is None else str(value)


_SCORER: _Scorer | None = None


def _start_process(job: Job, log_level: int) -> None:
    """A scoring process's initializer: logging, then both versions loaded once."""
    global _SCORER
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [backtest job] %(message)s")
    _SCORER = _Scorer(job)


def _score_in_process(partition_range: PartitionRange) -> Scored:
    assert _SCORER is not None, "the process was not initialized"
    return _SCORER.score(partition_range)


def plan_ranges(settings: PipelineSettings, start: Position, end: Position, timeout_s: float) -> list[PartitionRange]:
    """The partition ranges of the input topic between two positions."""
    consumer = reader(settings.kafka.common(), "backtest-plan")
    try:
        return resolve_range(consumer, settings.input.topic, start, end, timeout_s)
    finally:
        consumer.close()


def score_ranges(
    job: Job, ranges: list[PartitionRange], jobs: int = 1, on_scored: Callable[[int], None] | None = None
) -> Scored:
    """Score every range (in `jobs` processes when more than one), and join the results; ``on_scored`` is told
    of each batch scored (of each range, in processes)."""
    total = Scored()
    if jobs <= 1 or len(ranges) <= 1:
        scorer = _Scorer(job)
        for partition_range in ranges:
            total.extend(scorer.score(partition_range, on_scored))
        return total
    # spawn, not fork: the parent already runs librdkafka threads, which a fork would copy half-alive.
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(ranges)),
        mp_context=get_context("spawn"),
        initializer=_start_process,
        initargs=(job, logging.getLogger().getEffectiveLevel()),
    ) as pool:
        for scored in pool.map(_score_in_process, ranges):
            total.extend(scored)
            if on_scored is not None:
                on_scored(scored.events)
    return total


@dataclass(frozen=True)
class BacktestRequest:
    """What `streamserve backtest` was asked."""

    start: Position
    end: Position
    candidate: str | None
    candidate_uri: str | None = None
    jobs: int = 1
    batch_size: int = 1000
    predictions_topic: str | None = None
    parquet: Path | None = None
    timeout_s: float = 30.0


def run_backtest(settings: PipelineSettings, request: BacktestRequest) -> dict[str, Any]:
    """Resolve the versions and the range, score it with both, and return the report (JSON-ready)."""
    versions = resolve_versions(settings, request.candidate, request.candidate_uri)
    assert versions.candidate is not None
    features_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ranges = plan_ranges(settings, request.start, request.end, request.timeout_s)
    log.info("backtest: %d offsets in %d partition range(s)", sum(r.size for r in ranges), len(ranges))
    job = Job(
        settings, versions.live, versions.candidate, request.batch_size, request.predictions_topic, request.timeout_s
    )
    progress = Progress(sum(r.size for r in ranges), verb="scored", unit="events")
    try:
        scored = score_ranges(job, ranges, request.jobs, progress.advance)
    finally:
        progress.close()
    if request.parquet is not None:
        write_parquet(scored, request.parquet, versions.live.version, versions.candidate.version)
    report: dict[str, Any] = {
        "model": settings.model.name,
        "topic": settings.input.topic,
        "from": request.start.text,
        "to": request.end.text,
        "ranges": [{"partition": r.partition, "start": r.start, "end": r.end} for r in ranges],
        "live": {"version": versions.live.version, "uri": versions.live.uri, "origin": versions.live_origin},
        "candidate": {
            "version": versions.candidate.version,
            "uri": versions.candidate.uri,
            "origin": versions.candidate_origin,
        },
        "features": f"read from Redis as it is now ({features_at}), not as it was when the events happened",
        "events": scored.events,
        "compared": len(scored.offset),
        "rejected": dict(sorted(scored.rejected.items())),
        "live_only": scored.live_only,
        "agreement": agreement(scored.live_label, scored.candidate_label),
        "score_delta": score_deltas(scored.live_score, scored.candidate_score),
        "latency_ms_per_batch": {
            "batches": len(scored.batch_ms),
            "batch_size": request.batch_size,
            "batch": quantiles(scored.batch_ms, LATENCY_QUANTILES),
            "live_inference": quantiles(scored.live_ms, LATENCY_QUANTILES),
            "candidate_inference": quantiles(scored.candidate_ms, LATENCY_QUANTILES),
        },
        "quality": side_by_side(settings, scored, request.timeout_s),
        "predictions": {"topic": request.predictions_topic, "parquet": request.parquet and str(request.parquet)},
    }
    return report


def side_by_side(settings: PipelineSettings, scored: Scored, timeout_s: float) -> dict[str, Any]:
    """Both versions' quality on the events the labels topic has an outcome for; a note when it has none."""
    topic = settings.labels_topic
    consumer = reader(settings.kafka.common(), "labels")
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            return {"labels_topic": topic, "note": f"no labels: the labels topic {topic} does not exist"}
        ranges = resolve_range(consumer, topic, Position(edge="beginning"), Position(edge="end"), timeout_s)
        values = [record.value for batch in read_range(consumer, topic, ranges, 5000, timeout_s) for record in batch]
    finally:
        consumer.close()
    labels, unreadable = decode_labels(values)
    live = quality(scored.event_id, scored.live_score, scored.live_label, labels)
    if not live["labelled"]:
        note = f"no labels: none of the {len(labels)} labels on {topic} is for an event of the range"
        return {"labels_topic": topic, "note": note, "unreadable": unreadable}
    candidate = quality(scored.event_id, scored.candidate_score, scored.candidate_label, labels)
    return {"labels_topic": topic, "unreadable": unreadable, "live": live, "candidate": candidate}


def write_parquet(scored: Scored, path: Path, live_version: str, candidate_version: str) -> None:
    """The candidate's predictions (with the live ones beside them) as a Parquet file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise StreamServeError("--parquet needs pyarrow: pip install pyarrow") from exc
    table = pa.table(
        {
            "partition": pa.array(scored.partition, pa.int32()),
            "offset": pa.array(scored.offset, pa.int64()),
            "event_id": pa.array(scored.event_id, pa.string()),
            "candidate_version": pa.array([candidate_version] * len(scored.offset), pa.string()),
            "candidate_score": pa.array(scored.candidate_score, pa.float64()),
            "candidate_label": pa.array(scored.candidate_label, pa.string()),
            "live_version": pa.array([live_version] * len(scored.offset), pa.string()),
            "live_score": pa.array(scored.live_score, pa.float64()),
            "live_label": pa.array(scored.live_label, pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
