"""The newcomer's path on the real stack (issue 27, item 2b): their own schema and model, not among the examples
(tests/newcomer.py). `streamserve init` writes the config; the test fills in only the TODO the summary names;
`check` passes; then `topics create -> features load -> run -> produce`, each as a user runs it. Every prediction
equals offline onnxruntime on features rebuilt here from the events read back and the features file written
here; every other event is dead-lettered because a field read without a default was null."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import WorkerProcess, read_topic, unique
from tests.integration.servers import Servers
from tests.newcomer import CLASSES, write_inputs

EVENTS = 400
DEFAULT_RISK = 0.5


def streamserve(*args: str, env: dict[str, str], cwd: Path) -> str:
    """One CLI command as the user types it; its output (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "streamserve", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180
    )
    assert done.returncode == 0, f"streamserve {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_a_newcomers_schema_and_model_from_init_to_predictions(
    stack: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `export $(scripts/stack env)` leaves the shell: the worker process below inherits it too.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack.bootstrap_servers)
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    monkeypatch.setenv("STREAMSERVE_LOG_FORMAT", "text")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")},
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "REDIS_URL": stack.redis_url,
        "STREAMSERVE_LOG_FORMAT": "text",
    }
    schema_path, model_path = write_inputs(tmp_path)
    printed = streamserve("init", "--schema", schema_path.name, "--model", model_path.name, env=env, cwd=tmp_path)
    todos = printed.split("TODO(s)", 1)[1].split("next:", 1)[0]
    assert "sender_risk" in todos, printed
    assert todos.count("TODO:") == 1, printed

    # The one TODO the summary names, filled in as its example says: the sender's risk, from Redis.
    name = unique("newcomer")
    config = yaml.safe_load((tmp_path / "pipeline.yaml").read_text())
    key = f"{name}:sender:{{parcel_id}}"
    config["features"].append(
        {"name": "sender_risk", "source": "redis", "key": key, "field": "sender_risk", "default": DEFAULT_RISK}
        | {"input": "sender_risk"}
    )
    # Test isolation only (the shared stack): topics and group of this test's own.
    config["input"]["topic"] = f"{name}-scans"
    config["output"].update(topic=f"{name}-predictions", dead_letter_topic=f"{name}-scans.dlq")
    config["kafka"]["group_id"] = f"{name}-scorer"
    config["control"] = {"topic": f"{name}-control", "status_topic": f"{name}-status"}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    assert "ok: " in streamserve("check", "-c", "pipeline.yaml", env=env, cwd=tmp_path)
    streamserve("topics", "create", "-c", "pipeline.yaml", "--partitions", "2", env=env, cwd=tmp_path)
    risks = {f"parcel_id-{i}": round(0.02 * i, 2) for i in range(40)}  # parcel_id-40 ... -49: the default
    with (tmp_path / "senders.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["parcel_id", "sender_risk"])
        writer.writerows(risks.items())
    streamserve("features", "load", "--file", "senders.csv", "--key-template", key, env=env, cwd=tmp_path)
    assert "ok: " in streamserve("check", "-c", "pipeline.yaml", "--redis", env=env, cwd=tmp_path)

    worker = WorkerProcess(tmp_path / "pipeline.yaml", tmp_path, f"{name}-worker")
    try:
        streamserve("produce", "-c", "pipeline.yaml", "--count", str(EVENTS), "--seed", "5", env=env, cwd=tmp_path)
        events = [
            _decode(schema_path, msg.value()) for msg in read_topic(stack.bootstrap_servers, f"{name}-scans", EVENTS)
        ]
        usable = [e for e in events if e["parcel"] is not None and e["depot"]["load_factor"] is not None]
        outputs = read_topic(stack.bootstrap_servers, f"{name}-predictions", len(usable), timeout_s=120)
        dead = read_topic(stack.bootstrap_servers, f"{name}-scans.dlq", len(events) - len(usable), timeout_s=60)
        worker.assert_alive()
    finally:
        code = worker.stop()
    assert code == 0, worker.log_tail()

    assert len(events) == EVENTS
    assert 0 < len(usable) < EVENTS, "the nullable fields were null in some events"
    prediction_schema = load_schema(tmp_path / config["output"]["schema"])
    got = {p["event_id"]: p for p in (decode_prediction(prediction_schema, m.value()) for m in outputs)}
    assert sorted(got) == sorted(str(e["scanId"]) for e in usable), "one prediction per usable event, nothing else"
    assert len(dead) == EVENTS - len(usable)

    labels, probabilities = _offline(model_path, usable, risks)
    column = list(CLASSES).index(config["model"]["score_column"])
    assert [got[str(e["scanId"])]["predicted_class"] for e in usable] == labels.tolist()
    np.testing.assert_allclose(
        [got[str(e["scanId"])]["score"] for e in usable], probabilities[:, column], rtol=0, atol=1e-6
    )
    assert {got[str(e["scanId"])]["key"] for e in usable} == {e["parcel_id"] for e in usable}


def _decode(schema_path: Path, value: bytes) -> dict[str, Any]:
    import io

    import fastavro

    record = fastavro.schemaless_reader(io.BytesIO(value), load_schema(schema_path), None)
    assert isinstance(record, dict)
    return record


def _offline(model_path: Path, events: list[dict[str, Any]], risks: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """The model's outputs on the features rebuilt from the raw events and the features file, with onnxruntime."""

    def column(values: list[Any], dtype: Any) -> np.ndarray:
        return np.array(values, dtype=dtype).reshape(-1, 1)

    feeds = {
        "region": column([e["depot"]["region"] for e in events], object),
        "service_level": column([e["parcel"]["service_level"] for e in events], object),
        "weight_kg": column([e["parcel"]["weightKg"] for e in events], np.float32),
        "load_factor": column([e["depot"]["load_factor"] for e in events], np.float32),
        "distance_km": column([e["distance_km"] for e in events], np.float32),
        "sender_risk": column([risks.get(e["parcel_id"], DEFAULT_RISK) for e in events], np.float32),
    }
    labels, probabilities = ort.InferenceSession(str(model_path)).run(["label", "probabilities"], feeds)
    return np.asarray(labels), np.asarray(probabilities)
