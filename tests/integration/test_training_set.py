"""The feature log and the retraining set on the real broker and Redis, with the maintenance example: the worker
logs a hash-chosen share of its scored readings with the inputs as fed; the join pairs them with labels (late,
duplicated, of the wrong type, for unknown ids, and garbage bytes among them); the Parquet export's inputs are
what the model was fed: rebuilt here from the raw readings, and scored again offline by onnxruntime."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Producer

from streamserve.cli import main
from streamserve.demo.maintenance import CLASSES, Machines, TrainedModel, make_readings, model_inputs
from streamserve.monitor.join import run_join
from streamserve.monitor.trainingset import JoinCounts
from streamserve.ops.tools import produce_avro
from streamserve.pipeline.decode import load_schema
from streamserve.schemas import bundled
from tests.integration.harness import WorkerThread, predictions, read_topic
from tests.integration.maintenance import MaintenancePipeline
from tests.unit.test_trainingset import avro

SHARE = 0.4
READINGS = 800


@pytest.fixture
def logging_pipeline(maintenance_factory: Callable[..., MaintenancePipeline]) -> MaintenancePipeline:
    overrides = {
        "monitor.feature_log": True,
        "monitor.feature_log_share": SHARE,
        "monitor.feature_log_topic": "{name}-features",
        "monitor.labels_topic": "{name}-labels",
        "monitor.training_set_topic": "{name}-training",
        "monitor.drift_topic": "{name}-drift",
    }
    return maintenance_factory("fl", partitions=2, overrides=overrides)


def test_exported_rows_hold_what_the_model_was_fed_and_bad_labels_never_join(
    logging_pipeline: MaintenancePipeline,
    machines: Machines,
    maintenance_models: dict[str, TrainedModel],
    tmp_path: Path,
) -> None:
    s = logging_pipeline.settings
    kafka = {"bootstrap.servers": logging_pipeline.bootstrap}
    readings = list(make_readings(machines, READINGS, seed=61))
    sampled = {r["reading_id"] for r in readings if zlib.crc32(r["reading_id"].encode()) < SHARE * 2**32}
    worker = WorkerThread(s)
    try:
        produce_avro(kafka, s.input.topic, load_schema(s.input.schema_path), readings, "machine_id")
        predictions(logging_pipeline, len(readings))
    finally:
        worker.stop()
    logged = read_topic(logging_pipeline.bootstrap, s.monitor.feature_log_topic, len(sampled), settle_s=0.5)
    assert len(logged) == len(sampled), "exactly the hash-chosen share is logged"

    rng = np.random.default_rng(62)
    truth = {r["reading_id"]: CLASSES[int(rng.integers(len(CLASSES)))] for r in readings}
    producer = Producer(kafka)
    late = 3_600_000 * 5

    def send(event_id: str, value: object, label_time: int) -> None:  # keyed: one event's labels stay in order
        record = {"event_id": event_id, "label": value, "label_time": label_time}
        producer.produce(s.labels_topic, avro(bundled("label"), record), event_id.encode())

    for event_id, value in truth.items():
        send(event_id, value, 1_700_000_000_000 + late)
    for i, event_id in enumerate(sorted(sampled)[:20]):  # repeats with another value: the first label counts
        send(event_id, i, 1_700_000_000_000)
    for garbage in (b"\xff\xff\xff", b"", b"\x00" * 64):
        producer.produce(s.labels_topic, garbage)
    send("never-scored", 1, 0)
    assert producer.flush(30) == 0

    stop, counts = threading.Event(), []
    join = threading.Thread(target=lambda: counts.append(run_join(s, stop, log_every_s=1.0)), daemon=True)
    join.start()
    try:
        read_topic(logging_pipeline.bootstrap, s.monitor.training_set_topic, len(sampled), timeout_s=90, settle_s=1)
    finally:
        stop.set()
        join.join(60)
    assert counts, "the join stopped with its counts (it did not crash)"
    result: JoinCounts = counts[0]
    assert result.examples == len(sampled)
    assert result.bad_labels >= 3

    out = tmp_path / "training.parquet"
    assert main(["monitor", "export", "-c", str(logging_pipeline.path), "--to", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert {row["event_id"] for row in table} == sampled
    assert all(row["label"] == truth[row["event_id"]] for row in table), "the first label of each event, not a repeat"
    by_id = {r["reading_id"]: r for r in readings}
    rows = sorted(table, key=lambda row: row["event_id"])
    expected = model_inputs([by_id[row["event_id"]] for row in rows], machines)  # from the raw readings
    fed: dict[str, np.ndarray] = {}
    for name, offline in expected.items():
        column = [row[name] for row in rows]
        fed[name] = (
            np.array(column, dtype=object).reshape(len(rows), 1)
            if offline.dtype == object
            else np.array(column, dtype=np.float32).reshape(len(rows), -1)
        )
        if offline.dtype == object:
            assert fed[name].tolist() == offline.tolist(), name
        else:
            np.testing.assert_array_equal(fed[name], offline, err_msg=name)
    session = ort.InferenceSession(str(maintenance_models["v1"].path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], fed)
    np.testing.assert_allclose(
        [row["score"] for row in rows], probabilities[:, CLASSES.index("failure_imminent")], rtol=0, atol=1e-6
    )
    assert [row["predicted_label"] for row in rows] == labels.tolist()
    assert {row["model_version"] for row in rows} == {"v1"}
