"""streamserve.spark: a DataFrame of demo events on 2 partitions scored through mapInArrow by the worker's
BatchProcessor; the model loaded once per Python worker (counted); a Redis outage follows redis.on_error."""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet
import pytest
import redis
import yaml

from streamserve.config import load_settings
from streamserve.demo.data import Entities
from streamserve.demo.train import TrainedModel
from streamserve.spark import SparkScorer
from tests.integration.harness import Pipeline, demo_events, expected_scores, wait_until

ROWS = 20_000


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers import streamserve from this venv
    session = (
        SparkSession.builder.master("local[2]")
        .appName("streamserve-tests")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "2000")
        .getOrCreate()
    )
    yield session
    session.stop()
    # py4j logs "Closing down clientserver connection" at INFO from interpreter shutdown, after pytest closed
    # the stream its handler wrote to ("--- Logging error ---"): it has nothing left to say worth a line.
    logging.getLogger("py4j").setLevel(logging.WARNING)


def frame_of(spark: Any, events: list[dict[str, Any]], partitions: int) -> Any:
    table = pa.Table.from_pylist(events)
    return spark.createDataFrame(table.to_pandas()).repartition(partitions)


def test_dataframe_on_partitions_scores_like_offline_with_one_model_load_per_python_worker(
    spark: Any, pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel]
) -> None:
    # NaN amounts left out: Spark's pandas conversion turns NaN into null (a decode reject, not the worker's case)
    events = [e for e in demo_events(entities, ROWS, seed=51) if not math.isnan(e["amount"])]
    frame = frame_of(spark, events, 4)
    scorer = SparkScorer(spark, pipeline.settings)
    rows = [row.asDict(recursive=True) for row in scorer.score(frame).collect()]

    expected = expected_scores(events, entities, models["v1"])
    predicted = {r["event_id"]: r["score"] for r in rows if r["rejected"] is None}
    rejected = [r for r in rows if r["rejected"] is not None]
    assert len(predicted) + len(rejected) == len(events)
    assert predicted.keys() == expected.keys()
    np.testing.assert_allclose([predicted[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    assert {r["rejected"]["stage"] for r in rejected} == {"features"}, {r["rejected"]["reason"] for r in rejected}
    assert {r["source_partition"] for r in rows} == {0, 1, 2, 3}, "4 partitions scored"
    loads, batches = scorer.model_loads.value, scorer.batches.value
    assert loads, "the model was loaded"
    assert set(loads.values()) == {1}, f"one model load per Python worker, got {loads}"
    assert sum(batches.values()) > len(loads), f"workers reused their model for further batches: {batches}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test on a free port (stopped by its PID), never the shared one."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    port = _free_port()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url).ping())
        except redis.RedisError:
            return False

    wait_until(answers, 20, f"redis-server on port {port} answering")
    yield url, server
    if server.poll() is None:
        server.kill()
    server.wait(10)


@pytest.mark.parametrize("policy", ["dead_letter", "defaults"])
def test_redis_outage_on_spark_follows_the_on_error_policy(
    spark: Any, pipeline: Pipeline, entities: Entities, own_redis: tuple[str, Any], policy: str
) -> None:
    url, server = own_redis
    config = yaml.safe_load(pipeline.path.read_text())
    config["redis"] = {"url": url, "on_error": policy, "retries": 0}
    for feature in config["features"]:
        if feature["name"] == "merchant_risk":
            feature["default"] = 0.5  # every Redis feature has a default: `defaults` can score every row
    path = pipeline.path.with_name(f"outage-{policy}.yaml")
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(path)
    events = [e for e in demo_events(entities, 400, seed=52) if not math.isnan(e["amount"])]
    server.kill()  # Redis gone before the job: every batch meets the outage
    server.wait(10)
    rows = [
        row.asDict(recursive=True) for row in SparkScorer(spark, settings).score(frame_of(spark, events, 2)).collect()
    ]
    assert len(rows) == len(events)
    if policy == "dead_letter":
        assert {(r["rejected"]["stage"], r["rejected"]["error_class"]) for r in rows} == {("enrich", "EnrichError")}
    else:  # scored with every Redis feature at its default, marked degraded; an unknown merchant too
        assert all(r["rejected"] is None and r["degraded"] for r in rows)
        assert {r["event_id"] for r in rows} == {e["event_id"] for e in events}


def test_score_command_on_spark_writes_predictions_and_rejects(
    pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel], tmp_path: Path
) -> None:
    events = [e for e in demo_events(entities, 3000, seed=53) if not math.isnan(e["amount"])]
    source = tmp_path / "events.parquet"
    pa.parquet.write_table(pa.Table.from_pylist(events), source)
    output = tmp_path / "scores.parquet"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamserve",
            "score",
            "-c",
            str(pipeline.path),
            "--input",
            str(source),
            "--output",
            str(output),
            "--spark",
            "local[2]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    predicted = pa.parquet.read_table(output).to_pylist()
    rejects = pa.parquet.read_table(tmp_path / "scores.rejects.parquet").to_pylist()
    expected = expected_scores(events, entities, models["v1"])
    got = {p["event_id"]: p["score"] for p in predicted}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=0, atol=1e-6)
    assert len(rejects) == len(events) - len(expected)
    assert {r["stage"] for r in rejects} == {"features"}
    assert f"{len(expected):,} predictions" in done.stdout
