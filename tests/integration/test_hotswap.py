"""Model versions switched through the control topic while events flow."""

from __future__ import annotations

import itertools
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from streamserve.control.fetch import sha256_hex
from streamserve.control.publish import fleet_status, publish, rollback
from streamserve.control.rollout import AcceptancePolicy, ArtifactRef
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.routing import canary_bucket
from tests.integration.harness import (
    Pipeline,
    WorkerProcess,
    WorkerThread,
    offline_features,
    offline_scores,
    predictions,
    produce_events,
    produce_in_background,
    read_topic,
    wait_until,
)


def _control(pipeline: Pipeline) -> tuple[dict[str, Any], str, AcceptancePolicy, str]:
    s = pipeline.settings
    return {"bootstrap.servers": pipeline.bootstrap}, s.control.topic, AcceptancePolicy("fraud"), s.control.status_topic


def _assert_scores_match_named_version(
    records: list[dict[str, Any]],
    events: list[dict[str, Any]],
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
    prefix: str,
    artifacts: dict[str, str] | None = None,
) -> None:
    """Each prediction equals offline onnxruntime of the version it names (artifacts maps version -> model)."""
    index = {e["event_id"]: i for i, e in enumerate(events)}
    matrix = offline_features(events, redis_client, prefix)
    expected = {}
    for version in {r["model_version"] for r in records}:
        model = models[(artifacts or {}).get(version, version)]
        expected[version] = offline_scores(model, matrix)[0]
    for record in records:
        want = expected[record["model_version"]][index[record["event_id"]]]
        assert abs(record["score"] - want) <= 1e-5, (record, want)


def _longest_gap_ms(timestamps: list[int], start: int, end: int) -> int:
    window = sorted(t for t in timestamps if start <= t <= end)
    return max((b - a for a, b in itertools.pairwise(window)), default=0)


def test_deploy_v2_under_load_on_two_workers(
    pipeline: Pipeline,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    events = list(make_events(entities, 20_000, seed=51))
    workers = [WorkerProcess(pipeline.path, tmp_path, f"swap-{i}") for i in range(2)]
    for w in workers:
        w.wait_logged("assigned")
    producer = produce_in_background(pipeline, events, rate=3500)
    time.sleep(2.0)  # let a steady stream build up before the announcement
    config, topic, policy, status_topic = _control(pipeline)
    announced = publish(config, topic, policy, "v2", str(models["v2"].path))
    producer.join(60)
    outputs = predictions(pipeline, len(events), timeout_s=120)
    for w in workers:
        assert w.stop() == 0, w.log_tail()

    records = [record for _, record in outputs]
    assert {e["event_id"] for e in events} <= {r["event_id"] for r in records}, "every event predicted"
    versions = {r["model_version"] for r in records}
    assert versions == {"v1", "v2"}, f"only deployed versions, both seen: {versions}"
    _assert_scores_match_named_version(records, events, models, redis_client, pipeline.prefix)
    # Within an input partition, once switched, never back.
    by_partition: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for r in records:
        by_partition[r["source_partition"]].append((r["source_offset"], r["model_version"]))
    for partition, seq in by_partition.items():
        order = [v for _, v in sorted(seq)]
        first_v2 = order.index("v2")
        assert set(order[first_v2:]) == {"v2"}, f"partition {partition} went back to v1 after v2"
    status = {s.worker_id: s for s in fleet_status(config, status_topic)}
    assert {s.serving_version for s in status.values()} == {"v2"}
    assert set(status) == {"swap-0", "swap-1"}

    stamps = [msg.timestamp()[1] for msg, _ in outputs]
    switch = min(msg.timestamp()[1] for msg, r in outputs if r["model_version"] == "v2")
    pause = _longest_gap_ms(stamps, switch - 1000, switch + 1000)
    steady = _longest_gap_ms(stamps, min(stamps), announced.announced_at - 500)
    print(f"\nlongest output pause around the swap: {pause} ms (steady state before it: {steady} ms)")


def _bad_width_model(directory: Path) -> Path:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.random((200, 5), dtype=np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(int))
    path = directory / "five-inputs.onnx"
    path.write_bytes(to_onnx(model, x[:1], options={"zipmap": False}).SerializeToString())
    return path


def _rejected_version(worker: WorkerThread) -> str | None:
    follower = worker.worker.follower
    assert follower is not None
    return follower.last_rejection.version if follower.last_rejection else None


def test_rejected_versions_never_serve_and_say_why(
    pipeline: Pipeline,
    entities: Entities,
    models: dict[str, TrainedModel],
    tmp_path: Path,
) -> None:
    worker = WorkerThread(pipeline.settings)
    config, topic, policy, status_topic = _control(pipeline)
    events = list(make_events(entities, 6000, seed=61))
    producer = produce_in_background(pipeline, events, rate=2000)
    try:
        time.sleep(1.0)
        publish(config, topic, policy, "v2-tampered", str(models["v2"].path), sha256="0" * 64)
        wait_until(lambda: _rejected_version(worker) == "v2-tampered", 30, "digest rejection")
        status = fleet_status(config, status_topic)[0]
        # Accepted as the desired state (well-formed, signed if required) but no worker can load it.
        assert status.state == "degraded"
        assert status.rejected_version == "v2-tampered"
        assert "sha256 mismatch" in (status.reason or "")
        assert status.serving_version == "v1"

        publish(config, topic, policy, "v9-wrong-inputs", str(_bad_width_model(tmp_path)))
        wait_until(lambda: _rejected_version(worker) == "v9-wrong-inputs", 30, "signature rejection")
        status = fleet_status(config, status_topic)[0]
        assert "input 'X' takes 5 columns" in (status.reason or "")
        assert status.serving_version == "v1"
        producer.join(60)
        outputs = predictions(pipeline, len(events))
    finally:
        worker.stop()
    assert {r["model_version"] for _, r in outputs} == {"v1"}
    assert len({r["event_id"] for _, r in outputs}) == len(events)
    stamps = sorted(msg.timestamp()[1] for msg, _ in outputs)
    print(f"\nlongest output pause while two versions were rejected: {_longest_gap_ms(stamps, 0, 2**62)} ms")


def test_late_worker_converges_on_latest_deployment(
    pipeline: Pipeline,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    config, topic, policy, status_topic = _control(pipeline)
    v3 = tmp_path / "fraud-v3.onnx"
    shutil.copy(models["v2"].path, v3)  # same weights as v2, announced as a new version
    for version, path in (("v2", models["v2"].path), ("v1", models["v1"].path), ("v3", v3)):
        publish(config, topic, policy, version, str(path))
    worker = WorkerThread(pipeline.settings)
    events = list(make_events(entities, 500, seed=71))
    try:
        produce_events(pipeline, events)
        outputs = predictions(pipeline, len(events))
    finally:
        worker.stop()
    records = [r for _, r in outputs]
    assert {r["model_version"] for r in records} == {"v3"}
    _assert_scores_match_named_version(records, events, models, redis_client, pipeline.prefix, {"v3": "v2"})
    assert fleet_status(config, status_topic)[0].serving_version == "v3"


def test_rollback_is_instant_on_every_worker(
    pipeline: Pipeline,
    entities: Entities,
    models: dict[str, TrainedModel],
) -> None:
    config, topic, policy, _status_topic = _control(pipeline)
    workers = [WorkerThread(pipeline.settings) for _ in range(2)]
    try:
        v1_models = [w.worker.registry.routing.live for w in workers]
        v1 = ArtifactRef("v1", str(models["v1"].path), sha256_hex(models["v1"].path.read_bytes()))
        publish(config, topic, policy, "v2", str(models["v2"].path), config_model=v1)
        wait_until(lambda: all(w.worker.registry.routing.live.version == "v2" for w in workers), 30, "v2 served")
        batches_before = [w.worker.stats.batches for w in workers]
        producer = produce_in_background(pipeline, list(make_events(entities, 4000, seed=81)), rate=2000)
        announced = rollback(config, topic, policy)
        assert announced.version == "v1"
        wait_until(
            lambda: all(w.worker.registry.routing.live.version == "v1" for w in workers), 10, "every worker back on v1"
        )
        switched_after_s = time.time() - announced.announced_at / 1000
        producer.join(60)
    finally:
        for w in workers:
            w.stop()
    # The rollback reused the loaded v1 sessions: a pointer switch, no reload.
    assert [w.worker.registry.routing.live for w in workers] == v1_models
    print(
        f"\nrollback served on both workers within {switched_after_s * 1000:.0f} ms of the announcement; "
        f"batches before: {batches_before}"
    )


@pytest.mark.parametrize("mode", ["canary", "shadow"])
def test_canary_and_shadow(
    mode: str,
    pipeline: Pipeline,
    entities: Entities,
    models: dict[str, TrainedModel],
    redis_client: redis.Redis,
) -> None:
    config, topic, policy, _status_topic = _control(pipeline)
    worker = WorkerThread(pipeline.settings)
    events = list(make_events(entities, 3000, seed=91))
    try:
        publish(config, topic, policy, "v2", str(models["v2"].path), action=mode, canary_share=0.1)
        wait_until(lambda: worker.worker.registry.routing.mode == mode, 30, f"{mode} routing")
        produce_events(pipeline, events)
        outputs = predictions(pipeline, len(events))
        shadow = read_topic(pipeline.bootstrap, pipeline.settings.shadow_topic, len(events) if mode == "shadow" else 0)
    finally:
        worker.stop()
    records = [r for _, r in outputs]
    assert len(records) == len(events)
    _assert_scores_match_named_version(records, events, models, redis_client, pipeline.prefix)
    if mode == "canary":
        versions_by_key: dict[str, set[str]] = defaultdict(set)
        for r in records:
            versions_by_key[r["key"]].add(r["model_version"])
        assert all(len(v) == 1 for v in versions_by_key.values()), "a key never flips while the split holds"
        expected = {key: "v2" if canary_bucket(key) < 1000 else "v1" for key in versions_by_key}
        assert {key: v.pop() for key, v in versions_by_key.items()} == expected
        share = sum(v == "v2" for v in expected.values()) / len(expected)
        assert 0.05 <= share <= 0.15, share
        assert shadow == []
    else:
        assert {r["model_version"] for r in records} == {"v1"}, "shadow output never reaches the main topic"
        schema = load_schema(pipeline.settings.output.schema_path)
        from streamserve.pipeline.encode import decode_prediction

        shadow_records = [decode_prediction(schema, m.value()) for m in shadow]
        assert len(shadow_records) == len(events)
        assert {r["model_version"] for r in shadow_records} == {"v2"}
        _assert_scores_match_named_version(shadow_records, events, models, redis_client, pipeline.prefix)
