"""The worker's data plane outside the worker: one ``Scorer`` for every tool that scores records.

`streamserve score` (batch/), Spark (spark.py), `streamserve backtest` and `streamserve dlq replay --score` (ops/)
run records through exactly the decode -> features -> infer -> encode steps a worker runs (pipeline/process.py),
built from the pipeline's config as build_worker builds them; only the source (files, a DataFrame, a range of
history, dead letters) and the sink (files, a report, a transaction) differ. Model versions come from the config,
from the control topic as the workers read it (control/reading.py), or from a path.

A file or a DataFrame may carry a Redis feature as a column of its own name (``carried``): that feature is then
read from the event field of that name instead of Redis, by the same column builder as any event feature.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from streamserve.clients import redis_client
from streamserve.config import FeatureSpec, PipelineSettings
from streamserve.control.publish import control_log
from streamserve.control.reading import acceptance_policy
from streamserve.control.registry import ModelLoader
from streamserve.control.rollout import ArtifactRef
from streamserve.errors import ConfigError
from streamserve.pipeline.decode import Decoder, make_decoder
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.features import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor, BatchResult, StageObserver
from streamserve.pipeline.routing import Routing
from streamserve.records import Event, Rejected, Source

log = logging.getLogger(__name__)

_CARRIED_TYPES = {"string": "string", "bool": "boolean"}


# --- model versions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Versions:
    """The live version and (for a backtest) a candidate, each with where it was found."""

    live: ArtifactRef
    live_origin: str
    candidate: ArtifactRef | None = None
    candidate_origin: str = ""


def resolve_versions(settings: PipelineSettings, candidate: str | None, candidate_uri: str | None) -> Versions:
    """The live version as the control topic says now (the config's before any announcement), and the candidate:
    ``candidate_uri`` when given, else the newest accepted announcement of version ``candidate``."""
    config_ref = ArtifactRef(settings.model.version, settings.model.uri, settings.model.sha256 or "")
    live, live_origin = config_ref, "the pipeline config (model.uri)"
    announced: list[ArtifactRef] = []
    if settings.control.enabled:
        policy = acceptance_policy(settings.control, settings.model.name)
        history = control_log(settings.kafka.common(), settings.control.topic, policy)
        desired = history.state.desired
        if desired is not None and desired.live is not None:
            live, live_origin = desired.live, f"the control topic {settings.control.topic}"
        announced = [ArtifactRef(a.version, a.uri, a.sha256) for a in history.accepted]
    if candidate_uri is not None:
        ref = ArtifactRef(candidate or "candidate", candidate_uri, "")
        return Versions(live, live_origin, ref, f"--candidate-uri {candidate_uri}")
    if candidate is None:
        return Versions(live, live_origin)
    matches = [ref for ref in announced if ref.version == candidate]
    if not matches:
        known = sorted({ref.version for ref in announced}) or ["none"]
        raise ConfigError(
            f"version {candidate!r} was never accepted on the control topic {settings.control.topic} of model "
            f"{settings.model.name} (announced: {', '.join(known)}); publish it, or give --candidate-uri PATH"
        )
    return Versions(live, live_origin, matches[-1], f"the control topic {settings.control.topic}")


def load_model(settings: PipelineSettings, ref: ArtifactRef | None = None) -> OnnxModel:
    """One version (the config's model when ``ref`` is None) fetched, its digest checked, its inputs checked
    against the features, warmed up: as the worker loads it."""
    if ref is None:
        ref = ArtifactRef(settings.model.version, settings.model.uri, settings.model.sha256 or "")
    loader = ModelLoader(settings.model, settings.features, 1, settings.control.artifact_cache_dir.expanduser())
    return loader.load(ref.version, ref.uri, ref.sha256 or None)


# --- features an input carries itself ------------------------------------------------------------------------


def carried_features(settings: PipelineSettings, columns: Collection[str]) -> tuple[str, ...]:
    """The Redis features read from the input instead: those named like a column the input schema does not have."""
    fields = {field["name"] for field in event_schema(settings).get("fields", [])}
    return tuple(
        spec.name
        for spec in settings.features
        if spec.source == "redis" and spec.name in columns and spec.name not in fields
    )


def feature_sources(settings: PipelineSettings, carried: Collection[str]) -> dict[str, str]:
    """Where each feature comes from in this job: ``event``, ``redis`` or ``input column``."""
    return {spec.name: "input column" if spec.name in carried else spec.source for spec in settings.features}


def _from_column(spec: FeatureSpec) -> FeatureSpec:
    """A Redis feature read from the event field of its own name (the column the input carries)."""
    return spec.model_copy(
        update={
            "source": "event",
            "field": spec.name,
            "key": None,
            "layout": "hash",
            "index": None,
            "max_age_s": None,
            "updated_at_field": None,
        }
    )


def _with_carried(schema: dict[str, Any], features: Sequence[FeatureSpec]) -> dict[str, Any]:
    """The event schema with a nullable field per carried feature, so the feature's event path resolves."""
    extra = [
        {"name": spec.name, "type": ["null", _CARRIED_TYPES.get(spec.dtype, "double")], "default": None}
        for spec in features
    ]
    return {**schema, "fields": [*schema["fields"], *extra]}


def event_schema(settings: PipelineSettings) -> Any:
    """The input schema (JSON form)."""
    return json.loads(settings.input.schema_path.read_text())


def output_schema(settings: PipelineSettings) -> Any:
    """The prediction schema (JSON form)."""
    return json.loads(settings.output.schema_path.read_text())


# --- the processor -------------------------------------------------------------------------------------------


def build_processor(
    settings: PipelineSettings,
    *,
    carried: Sequence[str] = (),
    redis: Any = None,
    observer: StageObserver | None = None,
    decoder: Decoder | None = None,
    value_prefix: bytes = b"",
) -> BatchProcessor:
    """A BatchProcessor as build_worker makes it (same decoder, features, encoder, Redis policy).

    ``carried``: Redis features read from event fields of their names instead; ``redis``: a client to share (one
    is opened when a feature reads Redis and none is given); ``decoder``: the pipeline's (make_decoder) unless
    given; ``value_prefix``: written before each prediction (the wire format's), none by default.
    """
    schema = event_schema(settings)
    features = [_from_column(spec) if spec.name in carried else spec for spec in settings.features]
    feature_schema = _with_carried(schema, [spec for spec in settings.features if spec.name in carried])
    check_event_schema(feature_schema, settings.model_copy(update={"features": features}))
    fetcher = None
    if any(spec.source == "redis" for spec in features):
        fetcher = redis_fetcher(redis if redis is not None else redis_client(settings.redis), settings.redis)
    builder = FeatureBuilder(
        features,
        fetcher,
        event_schema=feature_schema,
        start_fetch=fetcher.start if fetcher is not None else None,
    )
    encoder = PredictionEncoder(
        settings.output.schema_path,
        settings.input,
        settings.output.copy_fields,
        value_prefix=value_prefix,
        event_schema=schema,
        headers=settings.output.headers,
    )
    return BatchProcessor(
        decoder if decoder is not None else make_decoder(settings.input.schema_path, settings.kafka),
        builder,
        encoder,
        settings.output.topic,
        settings.shadow_topic,
        settings.redis.on_error,
        observer=observer,
    )


class Scorer:
    """A pipeline's BatchProcessor with the versions it serves: Kafka records (``run``) or events decoded
    elsewhere, rows of a file or of a Spark batch (``run_events``, with ``prefetch_events`` to send the next
    batch's Redis lookup while this one is scored, as the worker does)."""

    def __init__(self, processor: BatchProcessor, routing: Routing) -> None:
        self.processor = processor
        self.routing = routing

    @classmethod
    def for_settings(
        cls,
        settings: PipelineSettings,
        model: OnnxModel | None = None,
        *,
        carried: Sequence[str] = (),
        redis: Any = None,
        decoder: Decoder | None = None,
        value_prefix: bytes = b"",
    ) -> Scorer:
        """The pipeline's processor serving ``model`` (the config's version, loaded now, when None)."""
        processor = build_processor(settings, carried=carried, redis=redis, decoder=decoder, value_prefix=value_prefix)
        return cls(processor, Routing(live=model if model is not None else load_model(settings)))

    def run(self, sources: list[Source]) -> BatchResult:
        """Records (their Avro bytes) through the whole processor, as the worker runs a batch."""
        return self.processor.run(sources, self.routing)

    def prefetch_events(self, events: list[Event]) -> None:
        """Send the Redis lookup of events that run_events() is given next (this very list)."""
        self.processor.prefetch_decoded(events)

    def run_events(self, events: list[Event], rejected: Sequence[Rejected] = ()) -> BatchResult:
        """Decoded events through features -> infer -> encode; ``rejected``: what their reading rejected."""
        return self.processor.run_decoded(events, self.routing, list(rejected))
