"""The predictive-maintenance example on the real broker and Redis: a multi-input model with string inputs and
string labels, served and hot-swapped; every prediction equals offline onnxruntime on the same raw readings."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np

from streamserve.control.publish import publish
from streamserve.control.rollout import AcceptancePolicy
from streamserve.demo.maintenance import CLASSES, Machines, TrainedModel, make_readings
from streamserve.ops.tools import produce_avro
from streamserve.pipeline.decode import load_schema
from tests.integration.harness import WorkerThread, predictions, read_topic, wait_until
from tests.integration.maintenance import MaintenancePipeline, offline_predictions

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def test_multi_input_string_label_model_served_and_hot_swapped_exactly_like_offline(
    example: MaintenancePipeline, machines: Machines, maintenance_models: dict[str, TrainedModel]
) -> None:
    s = example.settings
    schema = load_schema(s.input.schema_path)
    first = list(make_readings(machines, 1500, seed=31))
    second = list(make_readings(machines, 1500, seed=32))
    worker = WorkerThread(s)
    try:
        produce_avro({"bootstrap.servers": example.bootstrap}, s.input.topic, schema, first, "machine_id")
        predictions(example, len(first))
        publish(
            {"bootstrap.servers": example.bootstrap},
            s.control.topic,
            AcceptancePolicy(s.model.name),
            "v2",
            str(maintenance_models["v2"].path),
        )
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2", 60, "the worker serving v2")
        produce_avro({"bootstrap.servers": example.bootstrap}, s.input.topic, schema, second, "machine_id")
        outputs = predictions(example, len(first) + len(second))
    finally:
        worker.stop()

    records = [record for _, record in outputs]
    assert Counter(r["event_id"] for r in records) == Counter(r["reading_id"] for r in first + second)
    assert not read_topic(example.bootstrap, s.output.dead_letter_topic, 0, 2), "no reading is dead-lettered"
    by_id = {r["event_id"]: r for r in records}
    for version, readings in (("v1", first), ("v2", second)):
        labels, probabilities = offline_predictions(maintenance_models[version], readings, machines)
        got = [by_id[r["reading_id"]] for r in readings]
        assert {g["model_version"] for g in got} == {version}
        assert [g["predicted_class"] for g in got] == labels.tolist()
        assert all(g["label"] is None for g in got), "string labels travel in predicted_class"
        failure = CLASSES.index("failure_imminent")
        np.testing.assert_allclose([g["score"] for g in got], probabilities[:, failure], rtol=0, atol=1e-6)
        vectors = np.array([[g["probabilities"][c] for c in CLASSES] for g in got])
        np.testing.assert_allclose(vectors, probabilities, rtol=0, atol=1e-6)
    for reading in first + second:  # copied fields and the nullable event time travel as they were
        record = by_id[reading["reading_id"]]
        assert record["site"] == reading["site"]
        assert record["machine_model"] == reading["machine"]["model"]
        assert record["key"] == reading["machine_id"]
        if reading["event_time"] is None:
            assert record["event_time"] is None
        else:
            assert (record["event_time"] - EPOCH) // timedelta(milliseconds=1) == reading["event_time"]
    assert Counter(r["predicted_class"] for r in records).keys() <= set(CLASSES)
