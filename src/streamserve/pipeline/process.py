"""One micro-batch from input records to output records and dead letters, with no Kafka in it.

Every stage keeps what it could do and rejects what it could not, record by record: decode for the batch
(one fastavro read; record by record when a value is not a record); features for the batch, narrowed down
by bisection when an unforeseen error hits the whole batch; inference for the batch, bisected the same way
when onnxruntime rejects it, so one bad row does not take its neighbours with it; encoding per record. Only
platform failures (Redis under the ``fail`` policy, the Schema Registry under ``fail``) escape.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streamserve.errors import EnrichError, InferenceError
from streamserve.pipeline.decode import Decoder
from streamserve.pipeline.encode import ENCODE_STAGE, Encoded, EncodedBatch, PredictionEncoder
from streamserve.pipeline.features import FeatureBuilder, Lookup
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.routing import Routing
from streamserve.records import Event, FeatureBatch, ModelOutputs, Rejected, Source

log = logging.getLogger(__name__)

DECODE_STAGE = "decode"
FEATURES_STAGE = "features"
INFER_STAGE = "infer"
ENRICH_STAGE = "enrich"
PROCESS_STAGE = "process"
PREFETCHED = 2
"""Batches held prepared ahead at most: the one about to run and the one after it."""


class StageObserver(Protocol):
    """What the processor tells the telemetry: where each stage of a batch starts and ends."""

    def stage(self, name: str) -> AbstractContextManager[object]:
        """Around one stage's work (decode, enrich, encode, the whole process); recursive calls count once."""
        ...

    def inference(self, model_version: str) -> AbstractContextManager[object]:
        """Around one model's scoring of a lane's rows (the infer stage, and the model's inference time)."""
        ...


class ScoredTap(Protocol):
    """Told of each live lane's scored events; the records it returns are produced beside the predictions
    (the feature log, pipeline/featurelog.py)."""

    def scored(
        self,
        events: Sequence[Event],
        columns: dict[str, np.ndarray],
        rows: np.ndarray,
        outputs: ModelOutputs,
        model: OnnxModel,
    ) -> tuple[str, EncodedBatch] | None:
        """(topic, records) for the events the model scored and whose prediction was encoded: event i was fed
        the columns' row rows[i] and got the outputs' row i; None for nothing."""
        ...


class _Unobserved:
    def stage(self, name: str) -> AbstractContextManager[object]:
        """Nothing to record."""
        return _NOTHING

    def inference(self, model_version: str) -> AbstractContextManager[object]:
        """Nothing to record."""
        return _NOTHING


_NOTHING = nullcontext()


@dataclass(frozen=True, slots=True)
class _Ahead:
    """The next batch, decoded, with its Redis round trip under way (BatchProcessor.prefetch)."""

    sources: list[Source]
    events: list[Event]
    rejected: list[Rejected]
    lookup: Lookup | None
    decoded: bool = False
    """Events decoded elsewhere (prefetch_decoded): matched by the events list, not by the records."""


@dataclass(slots=True)
class BatchResult:
    """What one batch produced: output records per topic, rejected inputs, and counts for the stats."""

    outputs: list[tuple[str, EncodedBatch]] = field(default_factory=list)
    """Per lane, its topic and its records (parallel lists)."""
    rejected: list[Rejected] = field(default_factory=list)
    predictions: int = 0
    shadow: int = 0
    degraded: int = 0
    missing_defaults: int = 0
    stale_defaults: int = 0
    side: list[tuple[str, EncodedBatch]] = field(default_factory=list)
    """Records produced beside the predictions (feature log, drift): one the sink refuses is dropped, nothing else."""

    def records(self) -> Iterator[tuple[str, Encoded]]:
        """Every output record with its topic, lane after lane."""
        for topic, encoded in self.outputs:
            for record in encoded:
                yield topic, record


class BatchProcessor:
    """decode -> features -> infer (per routing lane) -> encode for one micro-batch."""

    def __init__(
        self,
        decode: Decoder,
        features: FeatureBuilder,
        encoder: PredictionEncoder,
        output_topic: str,
        shadow_topic: str,
        on_redis_error: str = "dead_letter",
        observer: StageObserver | None = None,
        taps: Sequence[ScoredTap] = (),
    ) -> None:
        """``taps``: told of each live lane's scored events (the feature log, drift); none by default."""
        self.decode = decode
        self.features = features
        self.encoder = encoder
        self.output_topic = output_topic
        self.shadow_topic = shadow_topic
        self.on_redis_error = on_redis_error
        self._observer: StageObserver = observer or _Unobserved()
        self._taps = tuple(taps)
        self._ahead: list[_Ahead] = []
        self.used_ahead = 0
        """Batches whose Redis lookup went out ahead (prefetch), while the batch before them was processed."""

    def prefetch(self, sources: list[Source]) -> None:
        """Decode a batch that comes next and send its Redis lookup now, so that Redis works through its keys
        while the current batch is scored, encoded and produced.

        run() uses what was prepared only when it is given these very records (the batcher's objects, in the
        same order); anything else (records dropped on revoke, a rewind) is processed from scratch. At most
        PREFETCHED batches are held: preparing one more forgets the oldest.
        """
        if not self.features.reads_redis or not sources or any(_same(a.sources, sources) for a in self._ahead):
            return
        values = [source.value for source in sources]
        if not self.decode.decodes_now(values):
            return  # a new writer schema id: the registry is asked when the batch runs, never ahead of its turn
        decoded = BatchResult()
        try:
            events = self.decode_batch(sources, decoded, values)
            lookup = self.features.start_lookup(events) if events else None
        except Exception:  # noqa: BLE001 - run() meets it again where it is handled (registry down, a record's keys)
            return
        self._ahead.append(_Ahead(sources, events, decoded.rejected, lookup))
        while len(self._ahead) > PREFETCHED:
            _cancel(self._ahead.pop(0))

    def prefetch_decoded(self, events: list[Event]) -> None:
        """prefetch() for events decoded elsewhere (rows of a file, of a Spark batch): send their Redis lookup now,
        for run_decoded() given this very list. At most PREFETCHED batches are held, as by prefetch()."""
        if not self.features.reads_redis or not events or any(a.events is events for a in self._ahead):
            return
        try:
            lookup = self.features.start_lookup(events)
        except Exception:  # noqa: BLE001 - run_decoded() meets it again where it is handled (a record's keys)
            return
        self._ahead.append(_Ahead([], events, [], lookup, decoded=True))
        while len(self._ahead) > PREFETCHED:
            _cancel(self._ahead.pop(0))

    def drop_prefetched(self) -> None:
        """Forget every batch prepared ahead (their lookups' replies are not read)."""
        ahead, self._ahead = self._ahead, []
        for each in ahead:
            _cancel(each)

    def run(self, sources: list[Source], routing: Routing) -> BatchResult:
        """Process one batch; every source ends in exactly one of result.outputs (live lane) or rejected."""
        with self._observer.stage(PROCESS_STAGE):
            result = BatchResult()
            ahead = self._take_ahead(sources)
            if ahead is not None:
                events, lookup = ahead.events, ahead.lookup
                result.rejected += ahead.rejected
                self.used_ahead += lookup is not None and lookup.replies.sent
            else:
                events, lookup = self.decode_batch(sources, result), None
            if events:
                self._features_and_score(events, routing, result, lookup)
            return result

    def run_decoded(self, events: list[Event], routing: Routing, rejected: list[Rejected] | None = None) -> BatchResult:
        """run() for events decoded elsewhere (rows of a file, of a Spark batch): features -> infer -> encode,
        with ``rejected`` (what their reading rejected) carried into the result."""
        with self._observer.stage(PROCESS_STAGE):
            result = BatchResult(rejected=list(rejected or ()))
            ahead = self._take(lambda a: a.decoded and a.events is events) if self._ahead else None
            lookup = ahead.lookup if ahead is not None else None
            self.used_ahead += lookup is not None and lookup.replies.sent
            if events:
                self._features_and_score(events, routing, result, lookup)
            return result

    def _features_and_score(
        self, events: list[Event], routing: Routing, result: BatchResult, lookup: Lookup | None
    ) -> None:
        batch = self._features(events, result, lookup)
        if batch.events:
            self._score(batch, routing, result)

    def _take_ahead(self, sources: list[Source]) -> _Ahead | None:
        """What was prepared ahead for these very records (and the older ones forgotten), if anything."""
        return self._take(lambda ahead: not ahead.decoded and _same(ahead.sources, sources))

    def _take(self, match: Callable[[_Ahead], bool]) -> _Ahead | None:
        """The batch prepared ahead that matches (the ones prepared before it forgotten), if any."""
        for position, ahead in enumerate(self._ahead):
            if match(ahead):
                for older in self._ahead[:position]:  # prepared for records that never came as a batch
                    _cancel(older)
                del self._ahead[: position + 1]
                return ahead
        return None

    def decode_batch(
        self, sources: list[Source], result: BatchResult, values: list[bytes | None] | None = None
    ) -> list[Event]:
        """The events of the records that decode; the others are rejected, each with its reason (``values``: the
        sources' values, when the caller has them already)."""
        events: list[Event] = []
        with self._observer.stage(DECODE_STAGE):
            if values is None:
                values = [source.value for source in sources]
            # One read per batch; RegistryUnavailable (the platform, not a record) propagates from decode_many.
            for source, decoded in zip(sources, self.decode.decode_many(values), strict=True):
                if isinstance(decoded, Exception):
                    result.rejected.append(Rejected.from_error(source, DECODE_STAGE, decoded))
                else:
                    events.append(Event(source, decoded))
        return events

    # --- features ----------------------------------------------------------------------------------------

    def _features(self, events: list[Event], result: BatchResult, lookup: Lookup | None = None) -> FeatureBatch:
        try:
            batch = self._isolated_build(events, redis_available=True, lookup=lookup)
        except EnrichError as exc:
            if self.on_redis_error == "fail":
                raise
            if self.on_redis_error == "defaults":
                batch = self._isolated_build(events, redis_available=False)
            else:
                result.rejected += [Rejected.from_error(e.source, exc.stage, exc) for e in events]
                return FeatureBatch(events=[], columns={})
        result.rejected += batch.rejected
        result.missing_defaults += batch.missing_defaults
        result.stale_defaults += batch.stale_defaults
        return batch

    def _isolated_build(self, events: list[Event], redis_available: bool, lookup: Lookup | None = None) -> FeatureBatch:
        """features.build, and when it fails unexpectedly, the halves apart until the failing events are alone."""
        try:
            with self._observer.stage(ENRICH_STAGE):
                return self.features.build(events, redis_available=redis_available, pending=lookup)
        except EnrichError:
            raise  # the feature store, not a record
        except Exception as exc:  # noqa: BLE001 - narrowed down to the records that cause it
            if len(events) == 1:
                log.warning("feature building failed for one record (%s): %s", type(exc).__name__, exc)
                failed = Rejected.from_error(events[0].source, FEATURES_STAGE, exc)
                return FeatureBatch(events=[], columns={}, rejected=[failed])
            middle = len(events) // 2
            return _concat(
                self._isolated_build(events[:middle], redis_available),
                self._isolated_build(events[middle:], redis_available),
            )

    # --- inference and encoding ---------------------------------------------------------------------------

    def _score(self, batch: FeatureBatch, routing: Routing, result: BatchResult) -> None:
        """Run the routing's plan: each lane's model scores its rows, live lanes' outputs are the predictions."""
        events = batch.events
        for lane in routing.plan(len(events), lambda: [self.encoder.key_of(event) or "" for event in events]):
            topic = self.output_topic if lane.live else self.shadow_topic
            self._emit(batch, lane.rows, lane.model, topic, result, live=lane.live)

    def _emit(
        self, batch: FeatureBatch, rows: np.ndarray, model: OnnxModel, topic: str, result: BatchResult, live: bool
    ) -> None:
        """Score the selected rows with one model and encode them; live=False (shadow) rejects nothing."""
        index = np.flatnonzero(rows)
        if not len(index):
            return
        columns = batch.columns if len(index) == len(batch.events) else batch.select(index)
        rejected: list[Rejected] = []
        unfit = model.unfit_rows(columns)
        if unfit.any():
            rejected += [
                Rejected(
                    batch.events[index[i]].source,
                    FEATURES_STAGE,
                    "ValueError",
                    f"a feature value does not fit the input types of model {model.name} {model.version}",
                )
                for i in np.flatnonzero(unfit)
            ]
            index = index[~unfit]
            columns = batch.select(index)
        # The selected events as a list (all of them, in one lane, as they are): no per-event numpy indexing.
        chosen = batch.events if len(index) == len(batch.events) else [batch.events[i] for i in index.tolist()]
        with self._observer.inference(model.version):
            scored = self.predict(model, columns, np.arange(len(index)), chosen, rejected)
        for positions, outputs in scored:
            finite = np.isfinite(outputs.score)
            for position in positions[~finite].tolist():
                rejected.append(
                    Rejected(
                        chosen[position].source,
                        INFER_STAGE,
                        InferenceError.__name__,
                        f"model {model.name} {model.version} returned a non-finite score",
                    )
                )
            if not finite.all():
                positions, outputs = positions[finite], outputs.take(np.flatnonzero(finite))
            events = chosen if len(positions) == len(chosen) else [chosen[p] for p in positions.tolist()]
            try:
                with self._observer.stage(ENCODE_STAGE):
                    encoded, failed = self.encoder.encode(events, outputs, model.name, model.version, batch.degraded)
            except Exception as exc:  # noqa: BLE001 - outputs the encoder cannot use: these rows fail, not the worker
                log.error("model %s %s outputs cannot be encoded: %s", model.name, model.version, exc)
                encoded, failed = (
                    EncodedBatch(),
                    [Rejected.from_error(event.source, ENCODE_STAGE, exc) for event in events],
                )
            rejected += failed
            if len(encoded):
                result.outputs.append((topic, encoded))
            if live and self._taps and len(encoded):
                self._tap_scored(events, columns, positions, outputs, failed, model, result)
            if live:
                result.predictions += len(encoded)
                result.degraded += len(encoded) if batch.degraded else 0
            else:
                result.shadow += len(encoded)
        if live:
            result.rejected += rejected

    def _tap_scored(
        self,
        events: list[Event],
        columns: dict[str, np.ndarray],
        positions: np.ndarray,
        outputs: ModelOutputs,
        failed: list[Rejected],
        model: OnnxModel,
        result: BatchResult,
    ) -> None:
        """Hand the taps the events whose prediction was encoded (those the encoder rejected are left out)."""
        if failed:
            refused = {id(rejected.source) for rejected in failed}
            kept = np.array([i for i, event in enumerate(events) if id(event.source) not in refused], dtype=np.intp)
            events, positions, outputs = [events[i] for i in kept.tolist()], positions[kept], outputs.take(kept)
        for tap in self._taps:
            try:
                side = tap.scored(events, columns, positions, outputs, model)
            except Exception:
                log.exception("%s failed on a batch of %s %s", type(tap).__name__, model.name, model.version)
                continue
            if side is not None:
                result.side.append(side)

    def predict(
        self,
        model: OnnxModel,
        columns: dict[str, np.ndarray],
        positions: np.ndarray,
        events: list[Event],
        rejected: list[Rejected],
    ) -> list[tuple[np.ndarray, ModelOutputs]]:
        """Outputs for the given rows (positions in the columns and in events); when the model fails on them,
        bisect until each failing row is alone."""
        try:
            return [(positions, model.predict({name: column[positions] for name, column in columns.items()}))]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises bare pybind errors; route, don't die
            if len(positions) == 1:
                rejected.append(Rejected.from_error(events[int(positions[0])].source, INFER_STAGE, exc))
                return []
            middle = len(positions) // 2
            return [
                *self.predict(model, columns, positions[:middle], events, rejected),
                *self.predict(model, columns, positions[middle:], events, rejected),
            ]


def _cancel(ahead: _Ahead) -> None:
    if ahead.lookup is not None:
        ahead.lookup.replies.cancel()


def _same(first: list[Source], second: list[Source]) -> bool:
    """The very same records in the same order (the batcher hands out its own objects: identity suffices)."""
    return len(first) == len(second) and all(map(operator.is_, first, second))


def _concat(first: FeatureBatch, second: FeatureBatch) -> FeatureBatch:
    """Two feature batches of disjoint events as one."""
    if not first.events and not first.columns:
        columns = second.columns
    elif not second.events and not second.columns:
        columns = first.columns
    else:
        columns = {name: np.concatenate([first.columns[name], second.columns[name]]) for name in first.columns}
    return FeatureBatch(
        events=first.events + second.events,
        columns=columns,
        missing_defaults=first.missing_defaults + second.missing_defaults,
        stale_defaults=first.stale_defaults + second.stale_defaults,
        degraded=first.degraded or second.degraded,
        rejected=first.rejected + second.rejected,
    )
