"""The batch processor with no Kafka: every record predicted or rejected once; a bad row is bisected out."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from streamserve.config import FeatureSpec, InputSettings, ModelSettings
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import PredictionEncoder, decode_prediction
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.routing import Routing
from streamserve.records import Source

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
EVENT = {
    "type": "record",
    "name": "Ticket",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "queue", "type": "string"},
        {"name": "wait_s", "type": ["null", "double"]},
    ],
}
FEATURES = [
    FeatureSpec(name="queue", source="event", field="queue", dtype="string", input="queue"),
    FeatureSpec(name="wait_s", source="event", field="wait_s", input="wait_s"),
]


def strict_model() -> bytes:
    """One-hot of `queue` over {billing, tech} that fails the whole batch on any other queue (zeros=0)."""
    nodes = [
        helper.make_node(
            "OneHotEncoder", ["queue"], ["onehot3d"], domain="ai.onnx.ml", cats_strings=["billing", "tech"], zeros=0
        ),
        helper.make_node("Flatten", ["onehot3d"], ["onehot"], axis=1),
        helper.make_node("Cast", ["onehot"], ["onehot32"], to=TensorProto.FLOAT),
        helper.make_node("Concat", ["onehot32", "wait_s"], ["features"], axis=1),
        helper.make_node(
            "LinearClassifier", ["features"], ["label", "probabilities"], domain="ai.onnx.ml",
            coefficients=[0.2, -0.1, -0.01, -0.2, 0.1, 0.01], intercepts=[0.0, 0.0], classlabels_ints=[0, 1],
            post_transform="SOFTMAX",
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tickets",
        [
            helper.make_tensor_value_info("queue", TensorProto.STRING, [None, 1]),
            helper.make_tensor_value_info("wait_s", TensorProto.FLOAT, [None, 1]),
        ],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return model.SerializeToString()


def make_processor(
    tmp_path: Path,
    features: list[FeatureSpec] = FEATURES,
    fetch: Any = None,
    on_redis_error: str = "dead_letter",
    start_fetch: Any = None,
) -> tuple[BatchProcessor, Routing]:
    """A processor of ticket events scored by the strict model, with the given features and feature fetcher
    (``start_fetch``: how it sends a lookup ahead)."""
    schema_path = tmp_path / "ticket.avsc"
    schema_path.write_text(json.dumps(EVENT))
    settings = InputSettings(topic="t", schema=schema_path, key_field="queue", event_id_field="id")
    model = OnnxModel.load(strict_model(), ModelSettings(name="tickets", uri="m.onnx"), "v1", features)
    encoder = PredictionEncoder(SCHEMAS / "prediction.avsc", settings)
    decode = LocalSchemaDecoder(load_schema(schema_path))
    builder = FeatureBuilder(features, fetch, start_fetch=start_fetch)
    processor = BatchProcessor(decode, builder, encoder, "out", "out.shadow", on_redis_error)
    return processor, Routing(live=model)


@pytest.fixture
def processor(tmp_path: Path) -> tuple[BatchProcessor, Routing]:
    return make_processor(tmp_path)


def avro(record: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(EVENT), record)
    return buffer.getvalue()


def test_one_row_the_model_rejects_takes_only_itself_out(processor: tuple[BatchProcessor, Routing]) -> None:
    run, routing = processor
    records = [{"id": f"t{i}", "queue": ["billing", "tech"][i % 2], "wait_s": float(i)} for i in range(200)]
    records[137]["queue"] = "sales"  # unknown to the strict encoder: onnxruntime fails the whole batch
    records[50]["wait_s"] = float("nan")  # a bad value: features stage
    values = [avro(r) for r in records] + [b"\x00\xff\x13", b""]  # garbage, empty
    sources = [Source("in", 0, i, None, v, None, 0) for i, v in enumerate(values)]

    result = run.run(sources, routing)

    predicted = [record.source.offset for _, record in result.records()]
    rejected = {item.source.offset: item for item in result.rejected}
    assert sorted(predicted + list(rejected)) == list(range(len(values))), "each record exactly once"
    assert {offset: item.stage for offset, item in rejected.items()} == {
        50: "features",
        137: "infer",
        200: "decode",
        201: "decode",
    }
    assert rejected[137].stacktrace, "the onnxruntime error travels with its stack trace"
    good = [r for i, r in enumerate(records) if i not in (50, 137)]
    session = ort.InferenceSession(strict_model(), providers=["CPUExecutionProvider"])
    _, probabilities = session.run(
        None,
        {
            "queue": np.array([[r["queue"]] for r in good], dtype=object),
            "wait_s": np.array([[r["wait_s"]] for r in good], dtype=np.float32),
        },
    )
    schema = load_schema(SCHEMAS / "prediction.avsc")
    scores = {decode_prediction(schema, record.value)["event_id"]: record for _, record in result.records()}
    got = [decode_prediction(schema, scores[r["id"]].value)["score"] for r in good]  # type: ignore[index]
    np.testing.assert_allclose(got, probabilities[:, 1], rtol=0, atol=1e-6)
    assert result.predictions == len(good)


def test_null_without_a_default_is_rejected_alone(
    processor: tuple[BatchProcessor, Routing],
) -> None:
    run, routing = processor
    values = [avro({"id": "a", "queue": "tech", "wait_s": None}), avro({"id": "b", "queue": "tech", "wait_s": 3.0})]
    result = run.run([Source("in", 0, i, None, v, None, 0) for i, v in enumerate(values)], routing)
    assert [item.source.offset for item in result.rejected] == [0]
    assert "missing" in result.rejected[0].message
    assert [record.source.offset for _, record in result.records()] == [1]
