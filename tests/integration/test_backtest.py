"""`streamserve backtest` on the real broker and Redis (issue 25): a range of the demo's input topic scored with the
candidate announced on the control topic and the live version, as a user runs the CLI.

The candidate's predictions must equal offline onnxruntime on features rebuilt here from the events and Redis;
the agreement figures must equal those recomputed here from both versions' offline labels; the pipeline's
consumer-group offsets must not move (read with the admin API before and after); garbage in the range and
events whose features are missing are reported, not fatal.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from streamserve.control.publish import publish
from streamserve.control.reading import acceptance_policy
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.ops.admin import TopicSpec, ensure_topics
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from streamserve.schemas import bundled
from tests.integration.harness import (
    Pipeline,
    offline_features,
    offline_scores,
    produce_events,
    read_topic,
    unique,
)
from tests.integration.poison import committed_offsets, read_all

GARBAGE = [b"", b"\x00\x01 not avro", b"\xff" * 40]


def _produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for i, value in enumerate(values):
        producer.produce(topic, value, f"garbage-{i}".encode(), partition=i % 4)
    assert producer.flush(30) == 0


def _backtest(pipe: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    """`streamserve backtest` as a user runs it."""
    command = [sys.executable, "-m", "streamserve", "backtest", "-c", str(pipe.path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _commit_group(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Give the pipeline's group committed offsets, as a worker that ran before would have."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in offsets.items()], asynchronous=False)
    finally:
        consumer.close()


def _labels(bootstrap: str, topic: str, outcomes: dict[str, int]) -> None:
    ensure_topics({"bootstrap.servers": bootstrap}, [TopicSpec(topic, 1)])
    producer = Producer({"bootstrap.servers": bootstrap})
    schema = bundled("label")
    for event_id, label in outcomes.items():
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, {"event_id": event_id, "label": label, "label_time": 1})
        producer.produce(topic, buffer.getvalue(), event_id.encode())
    producer.produce(topic, b"\x07 not a label", b"garbage")
    assert producer.flush(30) == 0


def test_backtest_scores_like_offline_onnxruntime_and_leaves_the_group_alone(
    pipeline_factory: Any,
    models: dict[str, TrainedModel],
    entities: Entities,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    labels_topic = unique("labels")
    pipe: Pipeline = pipeline_factory(**{"monitor.labels_topic": labels_topic})
    s = pipe.settings
    bootstrap = pipe.bootstrap
    # Demo events, plus some unlike the demo: huge and tiny amounts, and merchants Redis does not know (their
    # merchant_risk has no default in the test pipeline: rejected by the features stage).
    events = list(make_events(entities, 300, seed=41))
    for i, event in enumerate(events[::10]):
        event["amount"] = [0.01, 250_000.0][i % 2]
    unknown = {e["event_id"] for e in events[5::37]}
    for event in events:
        if event["event_id"] in unknown:
            event["merchant_id"] = "merchant-nobody-knows"
    produce_events(pipe, events)
    _produce_raw(bootstrap, s.input.topic, GARBAGE)
    _commit_group(bootstrap, s.kafka.group_id, s.input.topic, {0: 3, 1: 5, 2: 0, 3: 7})
    before = committed_offsets(bootstrap, s.kafka.group_id, s.input.topic, [0, 1, 2, 3])

    # v2 announced in shadow on the control topic: the fleet's live version stays the config's v1.
    policy = acceptance_policy(s.control, s.model.name)
    publish(s.kafka.common(), s.control.topic, policy, "v2", str(models["v2"].path), action="shadow")

    # The range: from offset 2 of every partition to its end, but partition 3 only up to offset 40.
    start = "0:2,1:2,2:2,3:2"
    records = [
        m for m in read_all(bootstrap, s.input.topic) if m.offset() >= 2 and (m.partition() != 3 or m.offset() < 40)
    ]
    by_value = {e["event_id"]: e for e in events}
    schema = load_schema(s.input.schema_path)
    in_range: list[dict[str, Any]] = []
    garbage_in_range = 0
    for msg in records:
        if (msg.key() or b"").startswith(b"garbage-"):
            garbage_in_range += 1
            continue
        decoded = fastavro.schemaless_reader(io.BytesIO(msg.value()), schema, None)
        in_range.append(by_value[decoded["event_id"]])
    scorable = [e for e in in_range if e["event_id"] not in unknown]
    assert garbage_in_range
    assert len(scorable) < len(in_range)

    outcomes = {e["event_id"]: int(i % 3 == 0) for i, e in enumerate(scorable[:80])}
    _labels(bootstrap, labels_topic, outcomes)
    predictions_topic = unique("candidate-predictions")
    report_path = tmp_path / "report.json"
    run = _backtest(
        pipe,
        *["--candidate", "v2", "--to", "3:40", "--jobs", "2", "--batch-size", "64"],
        *("--from", start, "--json", str(report_path), "--predictions-topic", predictions_topic),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "read from Redis as it is now" in run.stdout
    assert "agreement:" in run.stdout
    report = json.loads(report_path.read_text())

    # The candidate's predictions equal offline onnxruntime on features rebuilt here.
    matrix = offline_features(scorable, redis_client, pipe.prefix)
    v2_scores, v2_labels = offline_scores(models["v2"], matrix)
    v1_scores, v1_labels = offline_scores(models["v1"], matrix)
    output_schema = load_schema(s.output.schema_path)
    produced = [
        decode_prediction(output_schema, m.value()) for m in read_topic(bootstrap, predictions_topic, len(scorable))
    ]
    candidate = {p["event_id"]: p for p in produced}
    assert len(produced) == len(candidate) == len(scorable)
    got = [candidate[e["event_id"]] for e in scorable]
    assert {p["model_version"] for p in got} == {"v2"}
    np.testing.assert_allclose([p["score"] for p in got], v2_scores, rtol=0, atol=1e-6)
    assert [p["label"] for p in got] == v2_labels.tolist()

    # The agreement figures equal those recomputed from both versions' offline labels.
    agree = int((v1_labels == v2_labels).sum())
    assert report["compared"] == len(scorable)
    assert report["events"] == len(records)
    assert report["agreement"]["agree"] == agree
    assert report["agreement"]["flips"] == len(scorable) - agree
    assert report["agreement"]["rate"] == agree / len(scorable)
    confusion = {}
    for a, b in zip(v1_labels.tolist(), v2_labels.tolist(), strict=True):
        confusion.setdefault(str(a), {}).setdefault(str(b), 0)
        confusion[str(a)][str(b)] += 1
    assert report["agreement"]["confusion"] == confusion
    deltas = v2_scores.astype(np.float64) - v1_scores.astype(np.float64)
    assert abs(report["score_delta"]["quantiles"]["p50"] - float(np.quantile(deltas, 0.5))) < 1e-6
    assert report["rejected"] == {
        "decode: DecodeError": garbage_in_range,
        "features: FeatureError": len(in_range) - len(scorable),
    }
    assert report["live"]["version"] == "v1"
    assert report["candidate"]["version"] == "v2"
    assert "control topic" in report["candidate"]["origin"]
    assert report["latency_ms_per_batch"]["batches"] >= 4

    # Quality side by side from the labels topic, recomputed here.
    labelled = [i for i, e in enumerate(scorable) if e["event_id"] in outcomes]
    truth = np.array([outcomes[scorable[i]["event_id"]] for i in labelled])
    assert report["quality"]["live"] == {
        "labelled": len(labelled),
        "accuracy": float((v1_labels[labelled] == truth).mean()),
    }
    assert report["quality"]["candidate"]["accuracy"] == float((v2_labels[labelled] == truth).mean())
    assert report["quality"]["unreadable"] == 1

    # Nothing was committed for the pipeline's group.
    assert committed_offsets(bootstrap, s.kafka.group_id, s.input.topic, [0, 1, 2, 3]) == before


def test_backtest_without_labels_says_so_and_reads_a_time_range(
    pipeline_factory: Any,
    models: dict[str, TrainedModel],
    entities: Entities,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    pipe: Pipeline = pipeline_factory(partitions=2)
    events = list(make_events(entities, 40, seed=43))
    produce_events(pipe, events)
    report_path, parquet = tmp_path / "report.json", tmp_path / "candidate.parquet"
    run = _backtest(
        pipe,
        *("--candidate", "v2-file", "--candidate-uri", str(models["v2"].path), "--from=-1h"),
        *("--json", str(report_path), "--parquet", str(parquet)),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["compared"] == len(events)
    assert report["candidate"]["origin"].startswith("--candidate-uri")
    assert report["quality"]["note"].startswith("no labels")
    assert "quality: no labels" in run.stdout
    rows = {row["event_id"]: row for row in pq.read_table(parquet).to_pylist()}
    expected, _ = offline_scores(models["v2"], offline_features(events, redis_client, pipe.prefix))
    np.testing.assert_allclose([rows[e["event_id"]]["candidate_score"] for e in events], expected, rtol=0, atol=1e-6)
    assert {row["candidate_version"] for row in rows.values()} == {"v2-file"}
