"""batch.output: Parquet predictions built from the encoder's columns hold exactly what reading the encoder's Avro
records back gives (every field: ids, times, labels, class names, probabilities, further outputs, copied fields),
for every writing path of the encoder; a batch whose columns are not at hand is read back from its records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamserve.batch.output import ParquetPredictions, prediction_batch
from streamserve.pipeline.decode import LocalSchemaDecoder
from streamserve.pipeline.encode import EncodedBatch, PredictionEncoder
from streamserve.records import ModelOutputs
from tests.unit.test_encode import INPUT, PATHS, SCHEMAS, encoder_on, events


def read_back(schema_path: Path, encoded: EncodedBatch, arrow: pa.Schema) -> list[dict[str, Any]]:
    """The encoder's records decoded by fastavro, as Arrow holds them (the writer's fallback, independently)."""
    decoder = LocalSchemaDecoder(fastavro.parse_schema(json.loads(schema_path.read_text())))
    return pa.RecordBatch.from_pylist(decoder.decode_many(encoded.values), schema=arrow).to_pylist()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("outputs", ["labels", "classes", "regressor"])
def test_columns_give_the_rows_the_records_read_back_give(path: str, outputs: str, tmp_path: Path) -> None:
    encoder, n = encoder_on(path)
    rng = np.random.default_rng(3)
    model = {
        "labels": ModelOutputs(rng.random(n), np.arange(n, dtype=np.int64) - 7),
        "classes": ModelOutputs(
            rng.random(n).astype(np.float32),
            label_text=np.array(["low", "high"] * (n // 2) + ["low"] * (n % 2), dtype=object),
            probabilities=rng.random((n, 2)),
            classes=("low", "high"),
            extra={"margin": rng.random(n), "rank": np.arange(n, dtype=np.float64)},
        ),
        "regressor": ModelOutputs(rng.normal(size=n)),
    }[outputs]
    batch = events(n)
    encoded, rejected = encoder.encode(batch, model, "fraud", "v7", degraded=outputs == "regressor")
    assert not rejected
    assert encoded.columns is not None
    writer = ParquetPredictions(tmp_path / "p.parquet", json.loads((SCHEMAS / "prediction.avsc").read_text()))
    built = prediction_batch(encoded.columns, len(encoded), writer.schema)
    assert built is not None
    assert built.to_pylist() == read_back(SCHEMAS / "prediction.avsc", encoded, writer.schema)
    writer.write(encoded)
    writer.close()
    assert writer.from_columns == 1
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == built.to_pylist()


def test_copied_fields_and_a_batch_without_columns(tmp_path: Path) -> None:
    schema_path = SCHEMAS / "maintenance_prediction.avsc"
    schema = json.loads(schema_path.read_text())
    copy_fields = {"site": "event_id", "machine_model": "card_id"}
    encoder = PredictionEncoder(schema_path, INPUT, copy_fields)
    batch = events(30)
    encoded, rejected = encoder.encode(batch, ModelOutputs(np.linspace(0, 1, 30)), "m", "v1")
    assert not rejected
    writer = ParquetPredictions(tmp_path / "m.parquet", schema)
    expected = read_back(schema_path, encoded, writer.schema)
    assert [row["machine_model"] for row in expected] == [e.fields["card_id"] for e in batch]
    writer.write(encoded)
    alone = EncodedBatch(encoded.sources, encoded.keys, encoded.values, encoded.headers)  # no columns: read back
    writer.write(alone)
    writer.close()
    assert writer.from_columns == 1
    assert pq.read_table(tmp_path / "m.parquet").to_pylist() == expected + expected


def test_a_record_the_writer_refuses_leaves_the_batch_without_columns(tmp_path: Path) -> None:
    schema_path = SCHEMAS / "maintenance_prediction.avsc"
    encoder = PredictionEncoder(schema_path, INPUT, {"site": "event_id", "machine_model": "card_id"})
    batch = events(12)
    batch[4].fields["card_id"] = None  # machine_model is not nullable: this record alone is refused
    encoded, rejected = encoder.encode(batch, ModelOutputs(np.zeros(12)), "m", "v1")
    assert [r.source.offset for r in rejected] == [batch[4].source.offset]
    assert len(encoded) == 11
    assert encoded.columns is None
    writer = ParquetPredictions(tmp_path / "m.parquet", json.loads(schema_path.read_text()))
    writer.write(encoded)
    writer.close()
    assert writer.from_columns == 0
    assert pq.read_table(tmp_path / "m.parquet").to_pylist() == read_back(schema_path, encoded, writer.schema)
