"""`streamserve score`: Parquet and Avro container files scored with the worker's BatchProcessor.

Predictions equal offline onnxruntime on features rebuilt here from the raw events and Redis, and equal the real
worker's for the same events (a subset streamed through Kafka); bad rows land in the rejects file with their stage
and reason, exactly the ones the worker dead-letters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamserve.batch.job import score_files
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.pipeline.deadletter import HEADER_STAGE
from tests.integration.harness import (
    REPO,
    Pipeline,
    WorkerThread,
    demo_events,
    expected_scores,
    headers_of,
    predictions,
    produce_events,
    read_output,
    read_topic,
    write_parquet,
)

CARD_SCHEMA = json.loads((REPO / "src/streamserve/schemas/card_transaction.avsc").read_text())
ROWS = 100_000


def test_parquet_of_100k_demo_events_scores_like_offline_onnxruntime_and_the_worker(
    pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel], tmp_path: Path, redis_client: Any
) -> None:
    events = demo_events(entities, ROWS, seed=41)
    events[5]["hour_of_day"] = None  # not nullable in the schema: rejected when the file is read
    source = tmp_path / "events.parquet"
    write_parquet(source, events)
    output = tmp_path / "scores.parquet"

    done = _score_cli(pipeline, source, output, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "scored 100,000 rows" in done.stdout
    assert "rows/s" in done.stdout
    assert "features from redis: avg_amount_30d" in done.stdout

    predicted = read_output(output)
    rejects = read_output(tmp_path / "scores.rejects.parquet")
    expected = expected_scores(events, entities, models["v1"])
    expected.pop(events[5]["event_id"])
    assert len(predicted) + len(rejects) == ROWS, "every row is predicted or rejected"
    got = {p["event_id"]: p["score"] for p in predicted}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    reasons = {json.loads(r["row"])["event_id"]: (r["stage"], r["reason"]) for r in rejects}
    assert reasons[events[5]["event_id"]] == (
        "decode",
        "field hour_of_day is null; the input schema does not allow null",
    )
    assert reasons[events[7]["event_id"]][0] == "features"
    assert "merchant_risk" in reasons[events[7]["event_id"]][1]
    assert reasons[events[11]["event_id"]][0] == "features"

    # The real worker on a subset of the same events: the same scores, the same rows dead-lettered, same stages.
    subset = [e for i, e in enumerate(events[:3000]) if i != 5]
    produce_events(pipeline, subset)
    worker = WorkerThread(pipeline.settings)
    try:
        good = [e for e in subset if e["event_id"] in expected]
        streamed = {record["event_id"]: record for _, record in predictions(pipeline, len(good))}
        dead = read_topic(pipeline.bootstrap, pipeline.settings.output.dead_letter_topic, len(subset) - len(good), 60)
    finally:
        worker.stop()
    batch = {p["event_id"]: p for p in predicted}
    for event_id, record in streamed.items():
        assert record["score"] == batch[event_id]["score"], "bit-identical scores"
        assert record["label"] == batch[event_id]["label"]
        assert record["key"] == batch[event_id]["key"]
    assert streamed.keys() == {e["event_id"] for e in good}
    stages = sorted(headers_of(msg)[HEADER_STAGE].decode() for msg in dead)
    by_id = {e["event_id"] for e in subset} - streamed.keys()
    assert stages == sorted(reasons[event_id][0] for event_id in by_id)


def _score_cli(
    pipeline: Pipeline, source: Path, output: Path, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`streamserve score` as a user runs it (``extra``: more options, e.g. ``--spark local[2]``)."""
    command = [sys.executable, "-m", "streamserve", "score", "-c", str(pipeline.path)]
    return subprocess.run(
        [*command, "--input", str(source), "--output", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
    )


def test_bad_parquet_files_give_one_line_naming_file_and_column(
    pipeline: Pipeline, entities: Entities, tmp_path: Path
) -> None:
    events = list(make_events(entities, 50, seed=43))
    table = pa.Table.from_pylist(events)
    cases = {
        "missing.parquet": (table.drop_columns(["amount"]), "'amount'"),
        "wrongtype.parquet": (
            table.set_column(
                table.schema.get_field_index("amount"), "amount", pa.array([str(e["amount"]) for e in events])
            ),
            "'amount'",
        ),
    }
    for name, (data, _) in cases.items():
        pq.write_table(data, tmp_path / name)
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(table, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:-12] + b"\x00" * 12)  # the footer's length and magic gone
    cases["corrupt.parquet"] = (table, "corrupt")
    for name, (_, needle) in cases.items():
        done = _score_cli(pipeline, tmp_path / name, tmp_path / f"{name}.out.parquet")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert name in lines[0]
        assert needle in lines[0]
        assert "Traceback" not in done.stderr


def test_avro_container_input_and_output_score_like_offline(
    pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel], tmp_path: Path
) -> None:
    events = demo_events(entities, 3000, seed=44)
    source = tmp_path / "events.avro"
    with source.open("wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(CARD_SCHEMA), events)
    output = tmp_path / "scores.avro"
    summary = score_files(pipeline.settings, str(source), output)
    predicted = read_output(output)
    rejects = read_output(tmp_path / "scores.rejects.avro")
    expected = expected_scores(events, entities, models["v1"])
    assert summary.predictions == len(predicted) == len(expected)
    assert len(rejects) == len(events) - len(expected)
    got = {p["event_id"]: p["score"] for p in predicted}
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    assert {r["stage"] for r in rejects} == {"features"}
