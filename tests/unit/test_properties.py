"""Property-based tests (issue 10): generated schemas, features, models and records through the whole data path.

Every record of a generated batch must end either as a prediction (whose score is what onnxruntime gives
for the inputs worked out here from the written record) or as a dead letter with a stage and a reason, and
nothing may escape the batch processor. Feature paths into constructs the pipeline cannot read are refused
at start with an error naming the field.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamserve.config import FeatureSpec, InputSettings, ModelSettings
from streamserve.errors import ConfigError, DecodeError
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import PredictionEncoder, decode_prediction
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.fields import check_event_schema, resolve
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.routing import Routing
from streamserve.records import Source
from tests.unit.generated import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    MODULUS,
    Feature,
    Leaf,
    ModelInput,
    Reject,
    Scenario,
    build_model,
    epoch_millis,
    expected_columns,
    extra_outputs,
    render,
    scenarios,
    unfit,
)

PREDICTION_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "prediction.avsc"
STAGES = {"decode", "features", "infer", "encode"}
MODEL = ModelSettings(name="generated", uri="memory")

# More examples for a longer hunt: STREAMSERVE_PROPERTY_EXAMPLES=2000 pytest tests/unit/test_properties.py
PIPELINE_EXAMPLES = int(os.environ.get("STREAMSERVE_PROPERTY_EXAMPLES", "60"))
PIPELINE_RUNS = settings(
    max_examples=PIPELINE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def run_pipeline(scenario: Scenario, model_bytes: bytes) -> tuple[list[Source], Any]:
    """The scenario's records through BatchProcessor.run, as one micro-batch."""
    with tempfile.TemporaryDirectory() as tmp:
        schema_path = Path(tmp) / "event.avsc"
        schema_path.write_text(json.dumps(scenario.schema))
        input_settings = InputSettings(
            topic="in",
            schema=schema_path,
            key_field=scenario.key_field,
            event_id_field=scenario.id_field,
            event_time_field=scenario.time_field,
        )
        check_event_schema(
            scenario.schema,
            SimpleNamespace(input=input_settings, features=scenario.specs, output=SimpleNamespace(copy_fields={})),
        )
        model_settings = MODEL.model_copy(update={"extra_outputs": extra_outputs(scenario.inputs)})
        model = OnnxModel.load(model_bytes, model_settings, "1", scenario.specs)
        processor = BatchProcessor(
            LocalSchemaDecoder(load_schema(schema_path)),
            FeatureBuilder(scenario.specs, None, event_schema=scenario.schema),
            PredictionEncoder(PREDICTION_SCHEMA, input_settings, event_schema=scenario.schema),
            output_topic="out",
            shadow_topic="out.shadow",
        )
        sources = [
            Source(
                "in",
                offset % 3,
                offset,
                None,
                scenario.encode(record) if isinstance(record, dict) else record,
                None,
                1_700_000_000_000 + offset,
            )
            for offset, record in enumerate(scenario.records)
        ]
        return sources, processor.run(sources, Routing(live=model))


def offline_scores(scenario: Scenario, model_bytes: bytes, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """onnxruntime on input tensors built here from the expected feature columns."""
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {
        model_input.name: model_input.tensor([expected_columns(model_input, row) for row in rows])
        for model_input in scenario.inputs
    }
    names = ["probabilities", "label", *extra_outputs(scenario.inputs)]
    found = dict(zip(names, session.run(names, feeds), strict=True))
    return {**found, "score": found["probabilities"][:, 1].astype(np.float64)}


@PIPELINE_RUNS
@given(scenario=scenarios())
def test_every_record_is_predicted_or_dead_lettered_with_a_reason(scenario: Scenario) -> None:
    model_bytes = build_model(scenario.inputs)
    sources, result = run_pipeline(scenario, model_bytes)

    outputs = [encoded for topic, encoded in result.records() if topic == "out"]
    assert len(outputs) == len(list(result.records())), "no shadow lane: everything goes to the output topic"
    seen = Counter([o.source.offset for o in outputs] + [r.source.offset for r in result.rejected])
    assert seen == Counter(s.offset for s in sources), "each input ends exactly once: predicted or dead-lettered"
    for rejected in result.rejected:
        assert rejected.stage in STAGES, rejected
        assert rejected.message.strip(), rejected
        assert rejected.error_class, rejected
    rejected_by_offset = {r.source.offset: r for r in result.rejected}
    output_by_offset = {o.source.offset: o for o in outputs}
    prediction_schema = load_schema(PREDICTION_SCHEMA)

    # What should happen to each valid record, worked out from the written values.
    to_score: list[int] = []
    expected_rows: list[dict[str, Any]] = []
    for offset, record in enumerate(scenario.records):
        if not isinstance(record, dict):
            if offset in scenario.truncated or not record:
                assert rejected_by_offset[offset].stage == "decode", f"offset {offset}: {record!r} is not a record"
            continue
        expected = scenario.expect(record)
        bad = [name for name, columns in expected.items() if isinstance(columns, Reject)]
        if bad:
            rejected = rejected_by_offset.get(offset)
            assert rejected is not None, f"offset {offset} {record!r} should be rejected: {expected}"
            assert rejected.stage == "features", rejected
            assert any(f"feature {name!r}" in rejected.message for name in bad), (rejected.message, expected)
            continue
        if any(unfit(i, expected_columns(i, expected)) for i in scenario.inputs):
            assert rejected_by_offset[offset].stage == "features", f"offset {offset}: a value unfit for its input"
            continue
        assert offset not in rejected_by_offset or rejected_by_offset[offset].stage in ("infer", "encode"), (
            f"offset {offset} {record!r} has valid features {expected}, rejected: {rejected_by_offset.get(offset)}"
        )
        to_score.append(offset)
        expected_rows.append(expected)

    event(f"records: {len(scenario.records)}, to score: {len(to_score)}")
    for r in result.rejected:
        event(f"rejected at {r.stage}")
    for i in scenario.inputs:
        event(f"input {i.element} rank {i.rank}")
    for f in scenario.features:
        event(f"feature {f.role} {f.leaf.kind} {f.spec.dtype}")
    if not to_score:
        return
    offline = offline_scores(scenario, model_bytes, expected_rows)
    for position, offset in enumerate(to_score):
        score = float(offline["score"][position])
        if not math.isfinite(score):
            assert rejected_by_offset[offset].stage == "infer", f"offset {offset}: non-finite score {score}"
            continue
        record = scenario.records[offset]
        assert isinstance(record, dict)
        if scenario.time_field is not None:
            event_time = epoch_millis(record["event_time"])
            if event_time is not None and not MIN_TIME_MS <= event_time <= MAX_TIME_MS:
                assert rejected_by_offset[offset].stage == "encode", f"offset {offset}: event time {event_time}"
                continue
        assert offset in output_by_offset, f"offset {offset} should be predicted: {rejected_by_offset.get(offset)}"
        prediction = decode_prediction(prediction_schema, output_by_offset[offset].value)
        assert math.isfinite(prediction["score"])  # type: ignore[arg-type]
        assert prediction["score"] == pytest.approx(score, rel=1e-6, abs=1e-9), (offset, expected_rows[position])
        total = float(offline["total"][position])
        got_total = prediction["outputs"]["total"]  # type: ignore[index]
        assert got_total == pytest.approx(total, rel=1e-9, abs=1e-12, nan_ok=True), (offset, expected_rows[position])
        if "low_digits" in offline:
            assert prediction["outputs"]["low_digits"] == offline["low_digits"][position], (  # type: ignore[index]
                f"offset {offset}: the int64 input did not get exactly {expected_rows[position]}"
            )
        assert prediction["label"] == int(offline["label"][position])
        assert prediction["event_id"] == render(record["event_id"])
        assert prediction["key"] == render(record["key"])
        assert prediction["source_offset"] == offset
        event_time = prediction["event_time"]
        kafka_time = 1_700_000_000_000 + offset
        expected_time = kafka_time if scenario.time_field is None else epoch_millis(record["event_time"])
        got_time = None if event_time is None else epoch_millis(event_time)
        assert got_time == expected_time, (record.get("event_time"), event_time)


# --- what the property found or checks, as plain examples -----------------------------------------------------


def small_pipeline(fields: dict[str, Any], specs: list[FeatureSpec], element: str) -> Scenario:
    """Event fields ``fields`` (name -> Avro type) read by ``specs``, all feeding one model input of ``element``."""
    schema = {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "key", "type": "string"},
            *({"name": name, "type": avro} for name, avro in fields.items()),
        ],
    }
    features = [
        Feature(spec.model_copy(update={"input": "x"}), Leaf("v", "v", "", None, False, st.nothing())) for spec in specs
    ]
    width = sum(spec.width for spec in specs)
    return Scenario(
        schema, "event_id", "key", None, features, [ModelInput("x", element, 2, features, [1.0] * width)], [], set()
    )


def predict_one(scenario: Scenario, record: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """(result, the prediction's extra outputs) for one record."""
    scenario.records = [{"event_id": "e", "key": "k", **record}]
    _, result = run_pipeline(scenario, build_model(scenario.inputs))
    if not result.outputs:
        return result, {}
    prediction = decode_prediction(load_schema(PREDICTION_SCHEMA), next(result.records())[1].value)
    return result, prediction["outputs"]  # type: ignore[return-value]


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63), 2**53 + 1, -(2**62) - 1])
def test_int64_feature_reaches_an_int64_input_exactly(value: int) -> None:
    spec = FeatureSpec(name="count", source="event", field="v", dtype="int64")
    result, outputs = predict_one(small_pipeline({"v": "long"}, [spec], "int64"), {"v": value})
    assert not result.rejected, result.rejected[0].message
    assert outputs["low_digits"] == value % MODULUS


@pytest.mark.parametrize("value", [2**63 - 1, 2**53 + 1])
def test_int64_feature_beside_a_float_feature_reaches_an_int64_input_exactly(value: int) -> None:
    """Found by the property: the int64 column is stacked with a float64 one into float64, then cast back."""
    specs = [
        FeatureSpec(name="count", source="event", field="v", dtype="int64"),
        FeatureSpec(name="amount", source="event", field="w", dtype="float64"),
    ]
    result, outputs = predict_one(small_pipeline({"v": "long", "w": "double"}, specs, "int64"), {"v": value, "w": 0.0})
    assert not result.rejected, result.rejected[0].message
    assert outputs["low_digits"] == value % MODULUS, f"the model saw {outputs['total']:.0f} for {value}"


@pytest.mark.parametrize("value", [2**63 - 1, 2**53 + 1])
def test_int64_vector_feature_reaches_an_int64_input_exactly(value: int) -> None:
    """Vector features (length) go through float64 even for dtype int64 and an array of longs."""
    spec = FeatureSpec(name="counts", source="event", field="v", dtype="int64", length=1)
    result, outputs = predict_one(
        small_pipeline({"v": {"type": "array", "items": "long"}}, [spec], "int64"), {"v": [value]}
    )
    assert not result.rejected, result.rejected[0].message
    assert outputs["low_digits"] == value % MODULUS, f"the model saw {outputs['total']:.0f} for {value}"


def test_float64_feature_too_large_for_an_int64_input_is_not_fed_as_garbage() -> None:
    spec = FeatureSpec(name="amount", source="event", field="v", dtype="float64")
    result, outputs = predict_one(small_pipeline({"v": "double"}, [spec], "int64"), {"v": 1e300})
    assert result.rejected, f"1e300 was fed to an int64 input as {outputs}"
    assert result.rejected[0].stage == "features"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_event_value_read_as_bool_is_rejected(value: float) -> None:
    spec = FeatureSpec(name="flag", source="event", field="v", dtype="bool")
    result, outputs = predict_one(small_pipeline({"v": "double"}, [spec], "float"), {"v": value})
    assert result.rejected, f"{value} in an event field was read as a bool: {outputs}"
    assert result.rejected[0].stage == "features"


# --- decoding arbitrary bytes ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(max_records=1), junk=st.binary(max_size=64))
def test_decoder_raises_only_decode_errors(scenario: Scenario, junk: bytes) -> None:
    """Whatever the bytes, the decoder gives a record that round-trips, or a DecodeError (never another error)."""
    schema = fastavro.parse_schema(scenario.schema)
    decoder = LocalSchemaDecoder(schema)
    try:
        decoded = decoder(junk)
    except DecodeError:
        return
    assert isinstance(decoded, dict)
    fastavro.schemaless_writer(io.BytesIO(), schema, decoded)


# --- start-time checks of feature paths -----------------------------------------------------------------------

SUPPORTED = {
    # type -> (kind, nullable)
    "int": ("int", False),
    "long": ("int", False),
    "float": ("float", False),
    "double": ("float", False),
    "boolean": ("boolean", False),
    "string": ("string", False),
    "bytes": ("bytes", False),
    '{"type": "string", "logicalType": "uuid"}': ("string", False),
    '{"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2}': ("decimal", False),
    '{"type": "long", "logicalType": "timestamp-millis"}': ("timestamp", False),
    '{"type": "long", "logicalType": "timestamp-micros"}': ("timestamp", False),
    '{"type": "int", "logicalType": "date"}': ("date", False),
    '{"type": "int", "logicalType": "time-millis"}': ("time", False),
    '{"type": "enum", "name": "Colour", "symbols": ["RED", "GREEN"]}': ("enum", False),
}
UNSUPPORTED = {
    "map": {"type": "map", "values": "double"},
    "union": ["int", "string"],
    "nullable union": ["null", "int", "string"],
    "record": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "double"}]},
    "array": {"type": "array", "items": "double"},
    "array of maps": {"type": "array", "items": {"type": "map", "values": "double"}},
}

names = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)


@st.composite
def nested_path(draw: st.DrawFn, leaf_type: Any) -> tuple[dict[str, Any], str, bool]:
    """A record schema with ``leaf_type`` at the end of a path through 0-2 records or arrays; and its nullability."""
    top = draw(names)
    nullable = isinstance(leaf_type, list) or draw(st.booleans())  # a union is not put in another
    node: Any = ["null", leaf_type] if nullable and not isinstance(leaf_type, list) else leaf_type
    path = top
    for depth in range(draw(st.integers(0, 2))):
        parent = draw(names)
        if draw(st.booleans()):  # an array of records, one element picked by index
            items = {"type": "record", "name": f"Item{depth}", "fields": [{"name": top, "type": node}]}
            node = {"type": "array", "items": items}
            path, nullable = f"{parent}[{draw(st.integers(0, 3))}].{path}", True
        else:
            node = {"type": "record", "name": f"Level{depth}", "fields": [{"name": top, "type": node}]}
            if draw(st.booleans()):
                node, nullable = ["null", node], True
            path = f"{parent}.{path}"
        top = parent
    # The event id (and key) field comes first and is never the construct under test.
    fields = [{"name": "id" if top != "id" else "event_ref", "type": "string"}, {"name": top, "type": node}]
    return {"type": "record", "name": "Event", "fields": fields}, path, nullable


def _settings(features: list[FeatureSpec], schema: dict[str, Any]) -> Any:
    id_field = schema["fields"][0]["name"]
    return SimpleNamespace(
        input=SimpleNamespace(key_field=id_field, event_id_field=id_field, event_time_field=None),
        features=features,
        output=SimpleNamespace(copy_fields={}),
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data(), avro=st.sampled_from(sorted(SUPPORTED)))
def test_supported_paths_resolve(data: st.DataObject, avro: str) -> None:
    leaf_type = json.loads(avro) if avro.startswith("{") else avro
    schema, path, nullable = data.draw(nested_path(leaf_type))
    found = resolve(schema, path)
    kind, _ = SUPPORTED[avro]
    assert (found.kind, found.nullable) == (kind, nullable)
    fastavro.parse_schema(schema)  # the generated schema is valid Avro


@settings(max_examples=150, deadline=None)
@given(data=st.data(), construct=st.sampled_from(sorted(UNSUPPORTED)), dtype=st.sampled_from(["float64", "string"]))
def test_unsupported_constructs_are_refused_naming_the_field(data: st.DataObject, construct: str, dtype: str) -> None:
    schema, path, _ = data.draw(nested_path(UNSUPPORTED[construct]))
    fastavro.parse_schema(schema)
    spec = FeatureSpec(name="feature", source="event", field=path, dtype=dtype)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as refused:
        check_event_schema(schema, _settings([spec], schema))
    assert repr(path) in str(refused.value)


@settings(max_examples=1500, deadline=None)
@given(data=st.data(), construct=st.sampled_from(sorted(UNSUPPORTED)))
def test_paths_through_unsupported_constructs_are_refused(data: st.DataObject, construct: str) -> None:
    """A path that goes on past a map, a multi-type union or an array without an index."""
    schema, path, _ = data.draw(nested_path(UNSUPPORTED[construct]))
    deeper = f"{path}.x"
    if construct == "record":
        deeper = f"{path}.missing"
    spec = FeatureSpec(name="feature", source="event", field=deeper, dtype="float64")
    with pytest.raises(ConfigError) as refused:
        check_event_schema(schema, _settings([spec], schema))
    assert repr(deeper) in str(refused.value)
