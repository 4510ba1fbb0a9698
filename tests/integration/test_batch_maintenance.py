"""`streamserve score` on the predictive-maintenance example: nested records, enums, a decimal, nullable fields,
a string-label model; a Redis feature carried by the file as a column is read from that column."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamserve.batch.arrowtypes import arrow_schema
from streamserve.batch.job import score_files
from streamserve.demo.maintenance import CLASSES, Machines, TrainedModel, make_readings
from tests.integration.harness import REPO
from tests.integration.maintenance import MaintenancePipeline, offline_predictions

SCHEMA = json.loads((REPO / "src/streamserve/schemas/machine_reading.avsc").read_text())


def test_maintenance_parquet_scores_like_offline_with_a_feature_from_the_file(
    example: MaintenancePipeline, machines: Machines, maintenance_models: dict[str, TrainedModel], tmp_path: Path
) -> None:
    readings = list(make_readings(machines, 2000, seed=61))
    bad = {5: "ROCKET", 77: "WARP"}  # not symbols of enum OperatingMode: rejected when the file is read
    for row, mode in bad.items():
        readings[row]["mode"] = mode
    table = pa.Table.from_pylist(readings, schema=arrow_schema(SCHEMA))
    # hours_since_service travels in the file, different from Redis's: the file's value is the one used.
    carried = {
        m: {**v, "hours_since_service": str(float(v.get("hours_since_service", 0.0)) + 500)}
        for m, v in ((m, machines.redis.get(m, {})) for m in machines.models)
    }
    hours = [float(carried[r["machine_id"]]["hours_since_service"]) for r in readings]
    table = table.append_column("hours_since_service", pa.array(hours, pa.float64()))
    source = tmp_path / "readings.parquet"
    pq.write_table(table, source, row_group_size=512)
    output = tmp_path / "scores.parquet"

    summary = score_files(example.settings, str(source), output, batch_rows=700)

    assert summary.features["hours_since_service"] == "input column"
    assert summary.features["last_error"] == "redis"
    assert "features from input column: hours_since_service" in summary.text()
    predicted = pq.read_table(output).to_pylist()
    rejects = pq.read_table(tmp_path / "scores.rejects.parquet").to_pylist()
    assert sorted(r["source_row"] for r in rejects) == sorted(bad)
    assert all(r["stage"] == "decode" and "enum OperatingMode" in r["reason"] for r in rejects)
    good = [r for i, r in enumerate(readings) if i not in bad]
    from_file = replace(machines, redis={m: {**machines.redis.get(m, {}), **carried[m]} for m in machines.models})
    labels, probabilities = offline_predictions(maintenance_models["v1"], good, from_file)
    by_id = {p["event_id"]: p for p in predicted}
    got = [by_id[r["reading_id"]] for r in good]
    assert [g["predicted_class"] for g in got] == labels.tolist()
    vectors = np.array([[dict(g["probabilities"])[c] for c in CLASSES] for g in got])
    np.testing.assert_allclose(vectors, probabilities, rtol=0, atol=1e-6)
    assert [g["site"] for g in got] == [r["site"] for r in good]
    assert [g["event_time"] is None for g in got] == [r["event_time"] is None for r in good]
