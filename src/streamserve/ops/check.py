"""``streamserve check``: a pipeline config tried offline, before any server is involved.

It runs the checks a worker runs at start - the config's keys and values, the files it names, every field the
pipeline reads against the event schema (pipeline/fields.py), every model input and output against the features
and the model settings (the registry's loader: signature, warm-up) - and collects every problem as one line
instead of stopping at the first. Then it builds the worker's own BatchProcessor with stand-in Redis replies
(each feature's default; ``--redis`` reads the real feature store) and scores synthetic events made from the
schema (ops/synthetic.py), so a config that passes has scored events exactly as a worker would.
"""

from __future__ import annotations

import json
import re
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro

from streamserve.config import FeatureSpec, PipelineSettings, load_settings
from streamserve.control.registry import ModelLoader
from streamserve.errors import ConfigError, ModelError, StreamServeError
from streamserve.ops.preflight import local_model_path, shown
from streamserve.ops.signature import ModelSignature, read_signature
from streamserve.ops.synthetic import EventMaker
from streamserve.pipeline.decode import load_schema, make_decoder
from streamserve.pipeline.encode import PredictionEncoder, decode_prediction
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.features.replies import FeatureRequest, FetchFeatures, Replies
from streamserve.pipeline.fields import event_schema_problems
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.routing import Routing
from streamserve.records import Source


@dataclass
class CheckReport:
    """What check found: problems (each one line; none: the config is servable), notes, and a sample."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    scored: int = 0
    events: int = 0
    sample: dict[str, Any] | None = None


def run_check(config: Path, events: int = 100, seed: int = 0, fetch: FetchFeatures | None = None) -> CheckReport:
    """Check a pipeline config offline (``fetch``: a real feature fetcher for --redis; stand-ins otherwise)."""
    report = CheckReport(events=events)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        report.problems += _config_lines(str(exc))
        return report
    schema = _read_schema(settings, report)
    model_path = local_model_path(settings.model.uri)
    signature = _read_model(settings, model_path, report)
    if schema is not None:
        report.problems += event_schema_problems(schema, settings)
    if signature is not None:
        report.problems += unfed_inputs(signature, settings)
    if report.problems or schema is None:
        return report
    try:
        model = ModelLoader(
            settings.model, settings.features, 1, settings.control.artifact_cache_dir.expanduser()
        ).load(settings.model.version, settings.model.uri, settings.model.sha256)
    except StreamServeError as exc:
        report.problems.append(str(exc))
        return report
    _score_synthetic(settings, schema, model, signature, report, seed, fetch)
    return report


def _config_lines(message: str) -> list[str]:
    """A config error as problems: the validation's lines, each with the file named once in the first."""
    lines = message.splitlines()
    if len(lines) == 1:
        return lines
    return [f"{lines[0]} {lines[1].strip()}", *(line.strip() for line in lines[2:])]


def _read_schema(settings: PipelineSettings, report: CheckReport) -> Any:
    path = settings.input.schema_path
    for what, schema_path in (("input.schema", path), ("output.schema", settings.output.schema_path)):
        try:
            load_schema(schema_path)
        except ConfigError as exc:
            report.problems.append(f"{what}: {exc}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_model(settings: PipelineSettings, path: Path | None, report: CheckReport) -> ModelSignature | None:
    if path is None:
        report.notes.append(f"model.uri {settings.model.uri} is remote: fetched as a worker fetches it, to check it")
        return None
    if not path.is_file():
        report.problems.append(
            f"model.uri: model file {shown(path)} not found: train or publish a model first - export yours to ONNX"
            " at that path (or fix model.uri); `make demo` trains the examples' models"
        )
        return None
    try:
        return read_signature(path)
    except ModelError as exc:
        report.problems.append(str(exc))
        return None


def unfed_inputs(signature: ModelSignature, settings: PipelineSettings) -> list[str]:
    """One line per model input no feature feeds, naming its type and shape (the rest the loader checks)."""
    names = [t.name for t in signature.inputs]
    default = settings.model.input_name or (names[0] if len(names) == 1 else None)
    fed = {spec.input or default for spec in settings.features}
    return [
        f"model input {t.name!r} ({t.describe()}) is fed by no feature: add one with `input: {t.name}`"
        f" (a feature of dtype {t.dtype or '?'}{_columns(t.columns)}), e.g. from Redis:"
        f" {{name: {t.name}, source: redis, key: '<entity>:{{{settings.input.key_field}}}', field: {t.name},"
        f" input: {t.name}}}"
        for t in signature.inputs
        if t.name not in fed
    ]


def _columns(columns: int | None) -> str:
    return "" if columns == 1 else f", {columns or 'some'} columns in all"


# --- scoring synthetic events -------------------------------------------------------------------------------


def _score_synthetic(
    settings: PipelineSettings,
    schema: Any,
    model: OnnxModel,
    signature: ModelSignature | None,
    report: CheckReport,
    seed: int,
    fetch: FetchFeatures | None,
) -> None:
    """Score synthetic events through the worker's BatchProcessor; a problem when none scores."""
    try:  # the encoder checks the output schema against the outputs and copied fields, as the worker's does
        processor = _processor(settings, schema, fetch or StandInFeatures(settings.features))
    except StreamServeError as exc:
        report.problems.append(str(exc))
        return
    maker = EventMaker(
        schema,
        seed=seed,
        unique=[settings.input.event_id_field],
        lengths=_lengths(settings.features),
        choices=_choices(settings.features, signature),
    )
    parsed = load_schema(settings.input.schema_path)
    try:
        sources = [_source(settings, parsed, event, i) for i, event in enumerate(maker.events(report.events))]
    except (ValueError, TypeError) as exc:
        report.problems.append(f"cannot make synthetic events of {shown(settings.input.schema_path)}: {exc}")
        return
    result = processor.run(sources, Routing(model))
    values = [value for _, encoded in result.outputs for value in encoded.values]
    report.scored = len(values)
    if values:
        report.sample = decode_prediction(load_schema(settings.output.schema_path), values[0])
    reasons = Counter(f"{r.stage}: {_reason(r.message)}" for r in result.rejected)
    for reason, count in reasons.most_common(5):
        report.notes.append(f"{count} of {len(sources)} synthetic events would go to the dead-letter topic ({reason})")
    if not values:
        first = next(iter(reasons), "no output")
        report.problems.append(f"none of {len(sources)} synthetic events was scored: {first}")


def _reason(message: str) -> str:
    """A rejection's reason without what differs between events (ids, values), so that they count together."""
    return re.sub(r"'[^']*-\d+(-\d+)?'", "'...'", message)[:200]


def _processor(settings: PipelineSettings, schema: Any, fetch: FetchFeatures) -> BatchProcessor:
    """The worker's processor (wiring.build_worker's parts), schemaless in and out, with the given fetcher."""
    kafka = settings.kafka.model_copy(update={"schema_registry_url": None})  # offline: no registry is asked
    encoder = PredictionEncoder(
        settings.output.schema_path,
        settings.input,
        settings.output.copy_fields,
        event_schema=schema,
        headers=settings.output.headers,
    )
    features = FeatureBuilder(settings.features, fetch, event_schema=schema)
    return BatchProcessor(
        make_decoder(settings.input.schema_path, kafka),
        features,
        encoder,
        settings.output.topic,
        settings.shadow_topic,
        settings.redis.on_error,
    )


def _source(settings: PipelineSettings, parsed: Any, event: dict[str, Any], offset: int) -> Source:
    import io

    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, parsed, event)
    return Source(settings.input.topic, 0, offset, None, buffer.getvalue(), None, int(time.time() * 1000))


def _lengths(features: Sequence[FeatureSpec]) -> dict[str, int]:
    """Array lengths the events need: a vector feature's length, an indexed element's position + 1."""
    lengths: dict[str, int] = {}
    for spec in features:
        if spec.source != "event":
            continue
        if spec.length is not None:
            lengths[spec.field] = spec.length
        match = re.fullmatch(r"(.+)\[(\d+)\]", spec.field)
        if match:
            lengths[match.group(1)] = max(lengths.get(match.group(1), 0), int(match.group(2)) + 1)
    return lengths


def _choices(features: Sequence[FeatureSpec], signature: ModelSignature | None) -> dict[str, list[str]]:
    """String fields' values worth picking: a vocabulary, or the categories the model knows for the input."""
    choices: dict[str, list[str]] = {}
    for spec in features:
        if spec.source != "event" or not spec.categorical:
            continue
        known = list(spec.vocabulary or [])
        if not known and signature is not None:
            target = spec.input or (signature.inputs[0].name if len(signature.inputs) == 1 else "")
            known = list(signature.categories.get(target, ()))
        if known:
            choices[spec.field] = known
    return choices


class StandInFeatures:
    """Redis replies without Redis: each feature's default, a stand-in value where it has none (0, the first
    category, ``unknown``), and an update stamp of now, so every Redis feature is found and fresh."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        self.values: dict[str, bytes] = {}
        self.packed: dict[int, float] = {}
        for spec in features:
            if spec.source != "redis":
                continue
            value = spec.default if spec.default is not None else _stand_in(spec)
            if spec.layout == "packed" and spec.index is not None:
                self.packed[spec.index] = float(value)
            else:
                self.values.setdefault(spec.field, str(value).encode())
            if spec.updated_at_field:
                self.values[spec.updated_at_field] = b""  # filled at each call: now

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        now = str(int(time.time() * 1000)).encode()
        width = max(self.packed, default=-1) + 1
        vector = struct.pack(f"<{width}f", *(self.packed.get(i, 0.0) for i in range(width)))
        replies = []
        for fields, keys in requests:
            if fields is None:
                replies.append(Replies([vector] * len(keys)))
            else:
                row = [self.values.get(name) or now for name in fields]
                replies.append(Replies(row * len(keys)))
        return replies


def _stand_in(spec: FeatureSpec) -> float | str:
    if not spec.categorical:
        return 0.0
    return (spec.vocabulary or ["unknown"])[0]


def report_lines(report: CheckReport, config: Path) -> tuple[list[str], bool]:
    """What check prints, and whether the config passed: one line per problem, or what was scored and a sample."""
    if report.problems:
        lines = [f"problem: {problem}" for problem in report.problems]
        lines += [f"note: {note}" for note in report.notes]
        lines.append(
            f"{len(report.problems)} problem(s) in {shown(config)}; fix them and run `streamserve check` again"
        )
        return lines, False
    lines = [f"note: {note}" for note in report.notes]
    lines.append(f"ok: {report.scored} of {report.events} synthetic events scored through the worker's pipeline")
    if report.sample is not None:
        lines.append("sample prediction: " + json.dumps(report.sample, default=str, sort_keys=False))
    lines.append(f"next: streamserve topics create -c {shown(config)}  (then features load, run, produce)")
    return lines, True
