"""Rollout safety on the real broker: forged generations cannot block publishing, and a new version cannot
silently change what the score means."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from confluent_kafka import Producer

from streamserve.control.announcements import WorkerStatus
from streamserve.control.fetch import sha256_hex
from streamserve.control.publish import publish
from streamserve.control.reading import acceptance_policy, read_keyed_records
from streamserve.control.rollout import ArtifactRef
from streamserve.control.signing import generate, load_private, sign
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel, training_set
from tests.integration.harness import Pipeline, WorkerThread, offline_features, predictions, produce_events, wait_until

V1_CLASSES = ["high", "low", "medium"]


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Path, str]:
    private = tmp_path / "keys" / "release.pem"
    _, public = generate(private)
    return private, public


def _kafka(pipe: Pipeline) -> dict[str, Any]:
    return {"bootstrap.servers": pipe.bootstrap}


def _cli(pipe: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamserve", "models", *args, "-c", str(pipe.path), "--model", "fraud"]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _status_history(pipe: Pipeline) -> list[WorkerStatus]:
    """Every status record still on the topic, oldest first (not only the latest per worker)."""
    records = read_keyed_records(_kafka(pipe), pipe.settings.control.status_topic)
    return [WorkerStatus.decode(value) for _, value in records if value]


def _one_line_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_forged_generations_are_rejected_and_publish_and_rollback_still_work(
    pipeline_factory: Callable[..., Pipeline],
    signing_key: tuple[Path, str],
    entities: Entities,
    models: dict[str, TrainedModel],
    tmp_path: Path,
) -> None:
    pipe = pipeline_factory(**{"control.trusted_keys": [signing_key[1]]})
    key = load_private(signing_key[0])
    attacker_path = tmp_path / "keys" / "attacker.pem"
    generate(attacker_path)
    attacker = load_private(attacker_path)
    control = pipe.settings.control.topic
    worker = WorkerThread(pipe.settings)
    try:
        first = publish(
            _kafka(pipe),
            control,
            acceptance_policy(pipe.settings.control, "fraud"),
            "v2",
            str(models["v2"].path),
            sign_key=key,
            config_model=ArtifactRef("v1", str(models["v1"].path), sha256_hex(models["v1"].path.read_bytes())),
        )
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2", 60, "the worker serving v2")
        # What anyone who can write to the control topic can do, holding no trusted key: a plain producer.
        template = replace(first.unsigned(), version="v-forged", sha256=sha256_hex(models["v1"].path.read_bytes()))
        forged = {2**63 - 1, 2**62, -1, first.generation + 1}
        producer = Producer(_kafka(pipe))
        for generation in sorted(forged):
            unsigned = replace(template, generation=generation)
            for record in (unsigned, sign(unsigned, attacker)):
                producer.produce(control, record.encode(), record.record_key(), partition=0)
        assert producer.flush(30) == 0

        def rejected() -> set[int]:
            return {s.rejected_generation for s in _status_history(pipe) if s.rejected_version == "v-forged"}

        wait_until(lambda: rejected() == forged, 60, f"generations {sorted(forged)} rejected on the status topic")
        reasons = {s.reason for s in _status_history(pipe) if s.rejected_version == "v-forged"}
        assert all(reason and ("signature" in reason or "signed" in reason) for reason in reasons), reasons

        back = _cli(pipe, "rollback", "--sign-key", str(signing_key[0]))
        _one_line_ok(back)
        assert "-> v1 (generation 2)" in back.stdout, back.stdout
        wait_until(lambda: worker.worker.registry.routing.live.version == "v1", 60, "the worker back on v1")
        again = _cli(
            pipe, "publish", "--version", "v2-again", "--uri", str(models["v2"].path), "--sign-key", str(signing_key[0])
        )
        _one_line_ok(again)
        assert "generation 3" in again.stdout, again.stdout
        assert "did not verify and are ignored" in again.stderr, "the publisher reports what it set aside"
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2-again", 60, "the worker on v2-again")
        events = list(make_events(entities, 300, seed=401))
        produce_events(pipe, events)
        outputs = predictions(pipe, len(events))
    finally:
        worker.stop()
    assert {record["model_version"] for _, record in outputs} == {"v2-again"}
    assert worker.worker.follower is not None
    assert worker.worker.follower.rollout.generation == 3, "no forged generation was ever accepted"


def _string_classifier(entities: Entities, classes: list[str], path: Path) -> Path:
    """A scikit-learn classifier over the fraud features with string classes (sorted by scikit-learn)."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, _ = training_set(entities, 1500, seed=7)
    bands = np.digitize(x[:, 0], np.quantile(x[:, 0], np.linspace(0, 1, len(classes) + 1)[1:-1]))
    y = np.array(classes)[bands]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    assert list(model.classes_) == sorted(classes)
    onnx_model = to_onnx(model, x[:1], options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    path.write_bytes(onnx_model.SerializeToString())
    return path


def test_a_version_that_changes_what_an_integer_score_column_means_is_refused(
    pipeline_factory: Callable[..., Pipeline],
    signing_key: tuple[Path, str],
    entities: Entities,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    v1 = _string_classifier(entities, V1_CLASSES, tmp_path / "v1.onnx")
    v2 = _string_classifier(entities, ["critical", *V1_CLASSES], tmp_path / "v2.onnx")
    trust = {"control.trusted_keys": [signing_key[1]], "model.uri": str(v1)}
    pipe = pipeline_factory(**trust, **{"model.score_column": 0})  # P(high) in v1, P(critical) in v2
    publish_v2 = ("publish", "--version", "v2", "--uri", str(v2), "--sign-key", str(signing_key[0]))

    refused = _cli(pipe, *publish_v2)
    assert refused.returncode == 2, refused.stderr
    assert "failed local validation, not announced" in refused.stderr
    assert "name the class in the config (score_column: high)" in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("streamserve: error:")]
    assert len(errors) == 1, refused.stderr
    assert "Traceback" not in refused.stderr

    worker = WorkerThread(pipe.settings)
    try:
        unchecked = _cli(pipe, *publish_v2, "--no-validate")
        _one_line_ok(unchecked)

        def refused_by_worker() -> bool:
            r = worker.worker.follower.last_rejection if worker.worker.follower else None
            return r is not None and r.version == "v2" and "score_column: high" in r.reason

        wait_until(refused_by_worker, 60, "the worker refusing v2's score contract")
        assert worker.worker.registry.routing.live.version == "v1"
        wait_until(
            lambda: any(
                s.rejected_version == "v2" and "ScoreContractChanged" in (s.reason or "") for s in _status_history(pipe)
            ),
            30,
            "the refusal and its reason on the status topic",
        )
    finally:
        worker.stop()

    # Named, the class keeps its meaning whatever the order: the same v2 deploys and scores P(high).
    named = pipeline_factory(**trust, **{"model.score_column": "high"})
    worker = WorkerThread(named.settings)
    try:
        deployed = _cli(named, *publish_v2)
        _one_line_ok(deployed)
        assert "keeps the score contract of v1" in deployed.stdout
        wait_until(lambda: worker.worker.registry.routing.live.version == "v2", 60, "the worker serving v2")
        events = list(make_events(entities, 400, seed=402))
        produce_events(named, events)
        outputs = predictions(named, len(events))
    finally:
        worker.stop()
    by_id = {record["event_id"]: record for _, record in outputs}
    assert {record["model_version"] for record in by_id.values()} == {"v2"}
    matrix = offline_features(events, redis_client, named.prefix)
    session = ort.InferenceSession(str(v2), providers=["CPUExecutionProvider"])
    probabilities = session.run(["probabilities"], {"X": matrix})[0]
    high = ["critical", "high", "low", "medium"].index("high")
    served = np.array([by_id[event["event_id"]]["score"] for event in events])
    np.testing.assert_allclose(served, probabilities[:, high], rtol=0, atol=1e-6)
