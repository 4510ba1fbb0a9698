"""The sampled feature log with no Kafka: the inputs as fed, the prediction and version, and a sample that every
replay draws alike."""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import fastavro
import numpy as np
import onnxruntime as ort
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.config import InputSettings, ModelSettings
from streamserve.pipeline import featurelogavro
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import PredictionEncoder, decode_prediction
from streamserve.pipeline.featurelog import FeatureLog
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.routing import Routing
from streamserve.records import Event, Source
from streamserve.schemas import bundled
from tests.unit.test_process import EVENT, FEATURES, SCHEMAS, avro, strict_model

LOG_SCHEMA = bundled("feature_log")


def make(tmp_path: Path, share: float) -> tuple[BatchProcessor, Routing]:
    schema_path = tmp_path / "ticket.avsc"
    schema_path.write_text(json.dumps(EVENT))
    settings = InputSettings(topic="t", schema=schema_path, key_field="queue", event_id_field="id")
    model = OnnxModel.load(strict_model(), ModelSettings(name="tickets", uri="m.onnx"), "v7", FEATURES)
    log = FeatureLog("features", share, settings, EVENT)
    processor = BatchProcessor(
        LocalSchemaDecoder(load_schema(schema_path)),
        FeatureBuilder(FEATURES, None),
        PredictionEncoder(SCHEMAS / "prediction.avsc", settings),
        "out",
        "out.shadow",
        taps=[log],
    )
    return processor, Routing(live=model)


def read_log(value: bytes) -> dict[str, object]:
    record = fastavro.schemaless_reader(io.BytesIO(value), LOG_SCHEMA, None)
    assert isinstance(record, dict)
    return record


def tickets(count: int, seed: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"tk-{seed}-{i}", "queue": ["billing", "tech"][int(rng.integers(2))], "wait_s": float(rng.gamma(2, 30))}
        for i in range(count)
    ]


def test_every_scored_event_logged_with_the_inputs_it_was_fed(tmp_path: Path) -> None:
    processor, routing = make(tmp_path, share=1.0)
    records = tickets(300, seed=3)
    records[40]["queue"] = "sales"  # the model rejects it: no prediction, so no log record
    sources = [Source("in", 0, i, None, avro(r), None, 1_700_000_000_000 + i) for i, r in enumerate(records)]

    result = processor.run(sources, routing)

    assert {topic for topic, _ in result.side} == {"features"}  # one part per piece the bisection scored
    logged = [read_log(record.value) for _, batch in result.side for record in batch]
    predicted = {
        decode_prediction(load_schema(SCHEMAS / "prediction.avsc"), r.value)["event_id"]: r for _, r in result.records()
    }
    assert sorted(str(r["event_id"]) for r in logged) == sorted(str(k) for k in predicted)
    assert "tk-3-40" not in {r["event_id"] for r in logged}
    by_id = {r["id"]: r for r in records}
    for entry in logged:
        raw = by_id[entry["event_id"]]
        assert entry["features"] == {"queue": raw["queue"], "wait_s": raw["wait_s"]}
        assert entry["model_name"] == "tickets"
        assert entry["model_version"] == "v7"
    # What was logged, fed to onnxruntime on its own, gives the logged prediction.
    session = ort.InferenceSession(strict_model(), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(
        None,
        {
            "queue": np.array([[e["features"]["queue"]] for e in logged], dtype=object),  # type: ignore[index]
            "wait_s": np.array([[e["features"]["wait_s"]] for e in logged], dtype=np.float32),  # type: ignore[index]
        },
    )
    np.testing.assert_allclose([e["score"] for e in logged], probabilities[:, 1], rtol=0, atol=1e-6)
    assert [e["label"] for e in logged] == labels.tolist()


def test_the_sample_is_the_ids_hashing_below_the_share_whatever_the_batches(tmp_path: Path) -> None:
    records = tickets(4000, seed=9)
    share = 0.05
    expected = {r["id"] for r in records if zlib.crc32(str(r["id"]).encode()) < share * 2**32}
    sources = [Source("in", 0, i, None, avro(r), None, 0) for i, r in enumerate(records)]
    for batch_size in (4000, 333):
        processor, routing = make(tmp_path, share)
        logged: set[object] = set()
        for start in range(0, len(sources), batch_size):
            result = processor.run(sources[start : start + batch_size], routing)
            logged |= {read_log(record.value)["event_id"] for _, batch in result.side for record in batch}
        assert logged == expected
    assert 0.03 * len(records) < len(expected) < 0.07 * len(records)


def test_share_zero_logs_nothing(tmp_path: Path) -> None:
    processor, routing = make(tmp_path, share=0.0)
    sources = [Source("in", 0, i, None, avro(r), None, 0) for i, r in enumerate(tickets(200, seed=1))]
    assert processor.run(sources, routing).side == []


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.one_of(st.none(), st.text(max_size=30)), min_size=1, max_size=60),
    low=st.floats(0, 1),
    high=st.floats(0, 1),
)
def test_a_smaller_share_logs_a_subset_of_a_larger_one(ids: list[str | None], low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    settings_ = InputSettings.model_construct(event_id_field="id", event_time_field=None)
    events = [Event(Source("in", 0, i, None, None, None, 0), {"id": event_id}) for i, event_id in enumerate(ids)]
    small = set(FeatureLog("f", low, settings_, None).chosen(events))
    large = set(FeatureLog("f", high, settings_, None).chosen(events))
    assert small <= large
    assert set(FeatureLog("f", 1.0, settings_, None).chosen(events)) == set(range(len(events)))


@settings(max_examples=150, deadline=None)
@given(
    event_id=st.one_of(st.none(), st.text(max_size=40)),
    event_time=st.one_of(st.none(), st.integers(-(2**62), 2**62)),
    score=st.floats(allow_nan=False),
    label=st.one_of(st.none(), st.integers(-(2**62), 2**62), st.text(max_size=10)),
    numbers=st.lists(st.floats(allow_nan=False), min_size=0, max_size=5),
    texts=st.lists(st.text(max_size=12), min_size=0, max_size=3),
    vector=st.lists(st.floats(allow_nan=False), min_size=1, max_size=4),
)
def test_the_hand_written_bytes_are_fastavros(
    event_id: str | None,
    event_time: int | None,
    score: float,
    label: int | str | None,
    numbers: list[float],
    texts: list[str],
    vector: list[float],
) -> None:
    columns: dict[str, np.ndarray] = {f"n{i}": np.array([0.0, value]) for i, value in enumerate(numbers)}
    columns |= {f"t{i}": np.array(["x", value], dtype=object) for i, value in enumerate(texts)}
    columns["vec"] = np.array([vector, vector])
    values = [featurelogavro.feature_values(column, [1]) for column in columns.values()]
    written = b"".join(
        (
            featurelogavro.optional_text(event_id),
            featurelogavro.optional_long(event_time),
            featurelogavro.text("model"),
            featurelogavro.text("v1"),
            featurelogavro.double(score),
            featurelogavro.label(label),
            featurelogavro.feature_map([featurelogavro.text(name) for name in columns], [v[0] for v in values]),
            featurelogavro.varint(1_700_000_000_000),
        )
    )
    expected = io.BytesIO()
    record = {
        "event_id": event_id, "event_time": event_time, "model_name": "model", "model_version": "v1",
        "score": score, "label": label, "features": {name: column[1].tolist() if column.ndim == 2 else column[1]
                                                       for name, column in columns.items()},
        "logged_at": 1_700_000_000_000,
    }  # fmt: skip
    fastavro.schemaless_writer(expected, LOG_SCHEMA, record)
    assert written == expected.getvalue()
