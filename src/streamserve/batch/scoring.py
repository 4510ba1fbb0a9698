"""Scorer: the worker's BatchProcessor built for rows of files, and the features a file may carry itself."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from streamserve.batch.rows import Origin, RowReader
from streamserve.clients import redis_client
from streamserve.config import FeatureSpec, PipelineSettings
from streamserve.control.registry import ModelLoader
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.features import FeatureBuilder, redis_fetcher
from streamserve.pipeline.fields import check_event_schema
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor, BatchResult
from streamserve.pipeline.routing import Routing

_CARRIED_TYPES = {"string": "string", "bool": "boolean"}


def load_model(settings: PipelineSettings) -> OnnxModel:
    """The configured model version, fetched, verified, loaded and warmed up as the worker loads it."""
    model = settings.model
    loader = ModelLoader(model, settings.features, 1, settings.control.artifact_cache_dir.expanduser())
    return loader.load(model.version, model.uri, model.sha256)


def carried_features(settings: PipelineSettings, columns: Collection[str]) -> tuple[str, ...]:
    """The Redis features read from the input instead: those named like a column the input schema does not have."""
    schema = json.loads(settings.input.schema_path.read_text())
    fields = {field["name"] for field in schema.get("fields", [])}
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


def _with_carried(event_schema: dict[str, Any], features: Sequence[FeatureSpec]) -> dict[str, Any]:
    """The event schema with a nullable field per carried feature, so the feature's event path resolves."""
    extra = [
        {"name": spec.name, "type": ["null", _CARRIED_TYPES.get(spec.dtype, "double")], "default": None}
        for spec in features
    ]
    return {**event_schema, "fields": [*event_schema["fields"], *extra]}


class Scorer:
    """One pipeline's processor over record batches of input rows: rows -> events -> BatchProcessor.run_decoded."""

    def __init__(self, settings: PipelineSettings, model: OnnxModel, carried: Sequence[str] = (), redis: Any = None):
        """``carried``: Redis features read from input columns of their names; ``redis``: a client to share (one is
        opened when a feature still reads Redis and none is given)."""
        event_schema = json.loads(settings.input.schema_path.read_text())
        features = [_from_column(spec) if spec.name in carried else spec for spec in settings.features]
        schema = _with_carried(event_schema, [spec for spec in settings.features if spec.name in carried])
        check_event_schema(schema, settings.model_copy(update={"features": features}))
        self.rows = RowReader(event_schema, carried)
        self.settings = settings
        self.carried = tuple(carried)
        fetcher = None
        if any(spec.source == "redis" for spec in features):
            fetcher = redis_fetcher(redis if redis is not None else redis_client(settings.redis), settings.redis)
        builder = FeatureBuilder(
            features, fetcher, event_schema=schema, start_fetch=fetcher.start if fetcher is not None else None
        )
        encoder = PredictionEncoder(
            settings.output.schema_path,
            settings.input,
            settings.output.copy_fields,
            value_prefix=b"",  # files hold plain Avro records, never the registry wire format
            event_schema=event_schema,
            headers=settings.output.headers,
        )
        self.processor = BatchProcessor(
            LocalSchemaDecoder(load_schema(settings.input.schema_path)),  # unused: rows arrive decoded
            builder,
            encoder,
            settings.output.topic,
            settings.shadow_topic,
            settings.redis.on_error,
        )
        self.routing = Routing(live=model)

    def score(self, batch: pa.RecordBatch, origin: Origin) -> BatchResult:
        """The batch's predictions (result.outputs) and rejected rows, as the worker's processor makes them."""
        events, rejected = self.rows.events(batch, origin)
        return self.processor.run_decoded(events, self.routing, rejected)


def output_schema(settings: PipelineSettings) -> Any:
    """The prediction schema (JSON form)."""
    return json.loads(Path(settings.output.schema_path).read_text())
