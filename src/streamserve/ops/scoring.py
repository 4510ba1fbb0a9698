"""The worker's data plane outside the worker: the same BatchProcessor, built for operator tools.

A backtest and a dead-letter replay that scores directly run records through exactly the decode -> features ->
infer -> encode steps a worker runs (pipeline/process.py), with the pipeline's config; only the source (a range
of history) and the sink (a report, a transaction) differ. Model versions come from the control topic as the
workers read it (control/reading.py), or from a path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from streamserve.clients import redis_client
from streamserve.config import PipelineSettings
from streamserve.control.publish import control_log
from streamserve.control.reading import acceptance_policy
from streamserve.control.registry import ModelLoader
from streamserve.control.rollout import ArtifactRef
from streamserve.errors import ConfigError
from streamserve.pipeline.decode import make_decoder
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.features import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor, StageObserver

log = logging.getLogger(__name__)


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


def load_model(settings: PipelineSettings, ref: ArtifactRef) -> OnnxModel:
    """One version loaded, its digest checked, its inputs checked against the features, warmed up."""
    loader = ModelLoader(settings.model, settings.features, 1, settings.control.artifact_cache_dir.expanduser())
    return loader.load(ref.version, ref.uri, ref.sha256 or None)


def build_processor(settings: PipelineSettings, observer: StageObserver | None = None) -> BatchProcessor:
    """A BatchProcessor as build_worker makes it (same decoder, features, encoder, Redis policy), schemaless output."""
    event_schema = json.loads(settings.input.schema_path.read_text())
    check_event_schema(event_schema, settings)
    fetcher = redis_fetcher(redis_client(settings.redis), settings.redis)
    features = FeatureBuilder(settings.features, fetcher, event_schema=event_schema, start_fetch=fetcher.start)
    encoder = PredictionEncoder(
        settings.output.schema_path,
        settings.input,
        settings.output.copy_fields,
        event_schema=event_schema,
        headers=settings.output.headers,
    )
    return BatchProcessor(
        make_decoder(settings.input.schema_path, settings.kafka),
        features,
        encoder,
        settings.output.topic,
        settings.shadow_topic,
        settings.redis.on_error,
        observer=observer,
    )
