"""Prediction encoding: every field, exact event times, headers, several source topics, schema defaults."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest

from streamserve.config import InputSettings
from streamserve.errors import ConfigError
from streamserve.pipeline.avrocolumns import ROWS_BELOW
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import HEADER_NAMES, PredictionEncoder, decode_prediction
from streamserve.records import Event, ModelOutputs, Source

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
INPUT = InputSettings(
    topic="in",
    schema=SCHEMAS / "card_transaction.avsc",
    key_field="card_id",
    event_id_field="event_id",
    event_time_field="event_time",
)


def avro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def events(n: int, topic: str = "in") -> list[Event]:
    rng = np.random.default_rng(5)
    found = []
    for i in range(n):
        offset = int(rng.integers(0, 2**40)) if i % 3 else i
        event_time: Any = 1_700_000_000_000 + i
        if i % 2:  # fastavro decodes timestamp-millis to an aware datetime
            event_time = datetime.fromtimestamp(event_time / 1000, UTC)
        fields = {"event_id": f"ev-{i}-" + "é" * (i % 70), "card_id": f"card-{i % 7}", "event_time": event_time}
        found.append(Event(Source(topic, i % 12, offset, None, b"", None, 0), fields))
    return found


def expected(schema: Any, event: Event, score: float, label: int | None, now_ms: int, degraded: bool) -> bytes:
    event_time = event.fields["event_time"]
    return avro(
        schema,
        {
            "event_id": event.fields["event_id"],
            "key": event.fields["card_id"],
            "model_name": "fraud",
            "model_version": "v7",
            "score": score,
            "label": label,
            "event_time": event_time
            if isinstance(event_time, int)
            else (event_time - EPOCH) // timedelta(milliseconds=1),
            "prediction_time": now_ms,
            "source_topic": event.source.topic,
            "source_partition": event.source.partition,
            "source_offset": event.source.offset,
            "degraded": degraded,
            "predicted_class": None if label is None else str(label),
        },
    )


PATHS = ["column-wise", "row-wise", "record-by-record"]


def encoder_on(path: str) -> tuple[PredictionEncoder, int]:
    """An encoder and a batch size that take one writing path: the column writer's column path (a batch of
    ROWS_BELOW rows or more) or its row path (fewer), or fastavro record by record (no column writer)."""
    encoder = PredictionEncoder(SCHEMAS / "prediction.avsc", INPUT)
    if path == "record-by-record":
        encoder._columns = None
    return encoder, {"column-wise": 150, "row-wise": ROWS_BELOW - 1, "record-by-record": 40}[path]


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("degraded", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_encoded_bytes_equal_fastavro_of_the_full_record(
    with_labels: bool, degraded: bool, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streamserve.pipeline.encode.time.time", lambda: 1_800_000_000.123)
    encoder, n = encoder_on(path)
    batch = events(n)
    scores = np.random.default_rng(1).random(n)
    scores[3] = -0.0
    labels = np.arange(n, dtype=np.int64) - 75 if with_labels else None
    encoded, rejected = encoder.encode(batch, ModelOutputs(scores, labels), "fraud", "v7", degraded)
    assert not rejected
    schema = load_schema(SCHEMAS / "prediction.avsc")
    for i, record in enumerate(encoded):
        key, value, headers = record.key, record.value, record.headers
        label = int(labels[i]) if labels is not None else None
        assert value == expected(schema, batch[i], float(scores[i]), label, 1_800_000_000_123, degraded), i
        assert key == batch[i].fields["card_id"].encode()
        assert headers == [("streamserve.model.version", b"v7")], "by default the model version alone"
    assert all(record.headers is encoded[0].headers for record in encoded), "one header list for the batch"


HEADER_VALUES = {
    "model_name": lambda event: b"fraud",
    "model_version": lambda event: b"v7",
    "source_topic": lambda event: event.source.topic.encode(),
    "source_partition": lambda event: str(event.source.partition).encode(),
    "source_offset": lambda event: str(event.source.offset).encode(),
}


@pytest.mark.parametrize(
    "selected",
    [
        [],
        *[[name] for name in HEADER_VALUES],
        ["source_offset", "model_name"],
        ["source_topic", "source_partition"],
        list(HEADER_VALUES),
    ],
    ids=lambda selected: "+".join(selected) or "none",
)
def test_predictions_carry_exactly_the_selected_headers(selected: list[str]) -> None:
    encoder = PredictionEncoder(SCHEMAS / "prediction.avsc", INPUT, headers=selected)  # type: ignore[arg-type]
    batch = events(20, "a") + events(20, "bb")
    encoded, rejected = encoder.encode(batch, ModelOutputs(np.zeros(40), np.zeros(40, dtype=np.int64)), "fraud", "v7")
    assert not rejected
    order = list(HEADER_VALUES)  # always in this order, whatever the order of the setting
    for event, record in zip(batch, encoded, strict=True):
        expected = [(HEADER_NAMES[name], HEADER_VALUES[name](event)) for name in sorted(selected, key=order.index)]
        assert record.headers == expected
    lists = {id(record.headers) for record in encoded}
    if "source_offset" in selected:
        assert len(lists) == len(encoded)
    elif "source_topic" in selected or "source_partition" in selected:
        assert len(lists) == len({(e.source.topic, e.source.partition) for e in batch}), "one per source partition"
    else:
        assert len(lists) == 1, "one for the batch"


def test_an_unknown_header_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"output\.headers \['source_offest'\]"):
        PredictionEncoder(SCHEMAS / "prediction.avsc", INPUT, headers=["source_offest"])  # type: ignore[list-item]


def test_events_from_several_topics() -> None:
    encoder = PredictionEncoder(SCHEMAS / "prediction.avsc", INPUT)
    batch = events(4, "a") + events(3, "bb")
    encoded, _ = encoder.encode(batch, ModelOutputs(np.zeros(7), np.zeros(7, dtype=np.int64)), "fraud", "v1")
    schema = load_schema(SCHEMAS / "prediction.avsc")
    topics = [decode_prediction(schema, record.value)["source_topic"] for record in encoded]
    assert topics == ["a"] * 4 + ["bb"] * 3


def test_fields_the_encoder_does_not_know_take_their_schema_default(tmp_path: Path) -> None:
    raw = json.loads((SCHEMAS / "prediction.avsc").read_text())
    raw["fields"].append({"name": "tags", "type": {"type": "array", "items": "string"}, "default": []})
    raw["fields"].append({"name": "unit", "type": "string", "default": "EUR"})
    path = tmp_path / "prediction-with-more.avsc"
    path.write_text(json.dumps(raw))
    encoder = PredictionEncoder(path, INPUT)
    encoded, _ = encoder.encode(events(3), ModelOutputs(np.full(3, 0.5), np.ones(3, dtype=np.int64)), "fraud", "v1")
    record = decode_prediction(load_schema(path), encoded[2].value)
    assert record["score"] == 0.5
    assert record["tags"] == []
    assert record["unit"] == "EUR"


@pytest.mark.parametrize("path", PATHS)
def test_an_unreadable_event_time_rejects_its_event_alone(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch's columns are read at once; one event outside years 1-9999 sends the batch event by event,
    and the others come out byte for byte as they do without it."""
    monkeypatch.setattr("streamserve.pipeline.encode.time.time", lambda: 1_800_000_000.123)
    encoder, n = encoder_on(path)
    batch = events(n)
    bad = 17
    batch[bad] = Event(batch[bad].source, {**batch[bad].fields, "event_time": 253_402_300_800_000})
    scores = np.random.default_rng(2).random(n)
    encoded, rejected = encoder.encode(batch, ModelOutputs(scores), "fraud", "v7")
    assert [(r.source, r.stage) for r in rejected] == [(batch[bad].source, "encode")]
    assert "outside years 1-9999" in rejected[0].message
    keep = [i for i in range(n) if i != bad]
    alone, none_rejected = encoder.encode([batch[i] for i in keep], ModelOutputs(scores[keep]), "fraud", "v7")
    assert not none_rejected
    assert [(r.source, r.key, r.value) for r in encoded] == [(r.source, r.key, r.value) for r in alone]


@pytest.mark.parametrize("path", PATHS)
def test_class_probabilities_are_written_as_a_map_per_record(path: str) -> None:
    """A classifier's (rows, classes) probabilities become one map per record keyed by class name, with the
    float32 values exactly as onnxruntime gave them; a rejected event leaves its row out."""
    encoder, n = encoder_on(path)
    batch = events(n)
    batch[5] = Event(batch[5].source, {**batch[5].fields, "event_time": 253_402_300_800_000})  # rejected
    rng = np.random.default_rng(3)
    probabilities = rng.random((n, 3)).astype(np.float32)
    classes = ("no", "yes", "maybe")
    outputs = ModelOutputs(probabilities[:, 1].astype(np.float64), probabilities=probabilities, classes=classes)
    encoded, rejected = encoder.encode(batch, outputs, "m", "v1")
    assert [r.source for r in rejected] == [batch[5].source]
    schema = load_schema(SCHEMAS / "prediction.avsc")
    kept = [i for i in range(n) if i != 5]
    got = [decode_prediction(schema, record.value)["probabilities"] for record in encoded]
    assert got == [{c: float(p) for c, p in zip(classes, probabilities[i].tolist(), strict=True)} for i in kept]
