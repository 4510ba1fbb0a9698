"""`streamserve dlq inspect|replay` on the real broker and Redis with a real worker (issue 25).

Events whose merchant is not in Redis are dead-lettered by a worker; after the merchants are loaded, a replay
re-produces them to the input topic and the same worker predicts them, as offline onnxruntime scores them. A replay
SIGKILLed inside an open transaction (a test hook makes it hang there) and run again replays each dead letter once:
each event id is predicted exactly once; a further replay replays and predicts nothing. Records on the DLQ that are
no dead letters are reported and skipped.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import redis
from confluent_kafka import Producer

from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.ops.deadletters import HANG_AFTER_ENV
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import (
    Pipeline,
    WorkerProcess,
    offline_features,
    offline_scores,
    produce_events,
    read_topic,
    wait_until,
)
from tests.integration.poison import read_all

MISSING = 90
"""Dead letters to replay: enough for several transactions of 10 before the kill and after it."""


def _cli(pipe: Pipeline, *args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "streamserve", "dlq", *args, "-c", str(pipe.path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )
    assert run.returncode == 0, f"dlq {args} exited {run.returncode}: {run.stderr[-3000:]}"
    return run.stdout


def _predicted(pipe: Pipeline) -> Counter[str]:
    """Predictions per event id on the output topic (read committed, as any consumer reads them)."""
    from streamserve.pipeline.decode import load_schema

    schema = load_schema(pipe.settings.output.schema_path)
    return Counter(
        str(decode_prediction(schema, m.value())["event_id"])
        for m in read_all(pipe.bootstrap, pipe.settings.output.topic)
    )


def test_dead_letters_are_replayed_once_even_when_a_replay_is_killed(
    pipeline_factory: Any,
    models: dict[str, TrainedModel],
    entities: Entities,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    pipe: Pipeline = pipeline_factory(partitions=2)
    s = pipe.settings
    good = list(make_events(entities, 30, seed=51))
    stranded = list(make_events(entities, MISSING, seed=52))
    for i, event in enumerate(stranded):
        event["merchant_id"] = f"merchant-late-{i % 7}"  # not in Redis yet: no default, so dead-lettered
    worker = WorkerProcess(pipe.path, tmp_path, "replay-worker")
    produce_events(pipe, good + stranded)
    # Records on the DLQ that no worker wrote: reported, never replayed.
    producer = Producer({"bootstrap.servers": pipe.bootstrap})
    producer.produce(s.output.dead_letter_topic, b"\xff\xfe junk", b"junk", headers=[("streamserve.dlq.stage", None)])
    producer.produce(s.output.dead_letter_topic, None, None)
    assert producer.flush(30) == 0

    def dead_lettered() -> bool:
        worker.assert_alive()
        return len(read_all(pipe.bootstrap, s.output.dead_letter_topic)) >= MISSING + 2

    wait_until(dead_lettered, 90, f"{MISSING} dead letters from the worker")
    wait_until(lambda: sum(_predicted(pipe).values()) >= len(good), 60, "the good events' predictions")

    inspected = _cli(pipe, "inspect")
    assert f"{MISSING}  features / FeatureError" in inspected
    assert "merchant_risk" in inspected
    assert "sample: key 'card-" in inspected
    assert "(not a dead letter)" in inspected
    assert "not replayable" in inspected

    dry = _cli(pipe, "replay", "--stage", "features", "--dry-run")
    assert f"would replay {MISSING} of {MISSING} selected" in dry

    # The merchants are loaded now; a replay is killed inside its fourth transaction (35 written, 30 committed).
    for i in range(7):
        redis_client.hset(f"{pipe.prefix}:merchant:merchant-late-{i}", mapping={"risk_score": 0.1 * (i + 1)})
    log_path = tmp_path / "killed-replay.log"
    with log_path.open("wb") as log_file:
        killed = subprocess.Popen(
            [sys.executable, "-m", "streamserve", "dlq", "replay", "-c", str(pipe.path), "--per-transaction", "10"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, HANG_AFTER_ENV: "35"},
        )
        try:
            wait_until(lambda: "hanging inside an open transaction" in log_path.read_text(errors="replace"), 60,
                       "the replay to hang mid-transaction")  # fmt: skip
        finally:
            killed.kill()
            killed.wait(10)
    assert f"replayed 30 of {MISSING} dead letters" in log_path.read_text()

    resumed = _cli(pipe, "replay", "--per-transaction", "10")
    assert f"replayed {MISSING - 30} of {MISSING + 2} selected dead letter(s); 30 replayed before" in resumed

    wanted = {e["event_id"] for e in stranded}

    def all_predicted() -> bool:
        worker.assert_alive()
        return wanted <= set(_predicted(pipe))

    wait_until(all_predicted, 90, "predictions of every replayed event")
    again = _cli(pipe, "replay")
    assert f"replayed 0 of {MISSING + 2} selected dead letter(s); {MISSING} replayed before" in again
    # Let the worker catch up with anything a duplicate would have been, then count per event id.
    worker.stop()
    counts = _predicted(pipe)
    assert {event_id: counts[event_id] for event_id in wanted} == dict.fromkeys(wanted, 1)
    assert all(counts[e["event_id"]] == 1 for e in good)

    # Each replayed record went back to the partition its original was read from, with its original key.
    inputs = read_topic(pipe.bootstrap, s.input.topic, len(good) + 2 * MISSING, isolation="read_committed")
    assert len(inputs) == len(good) + 2 * MISSING
    # The killed replay's 5 records of its open transaction are in the log, aborted: no consumer that reads
    # committed records (every worker) sees them.
    everything = read_topic(pipe.bootstrap, s.input.topic, len(inputs) + 5)
    assert len(everything) == len(inputs) + 5
    stranded_keys = {e["card_id"].encode() for e in stranded}
    places: dict[bytes, set[int]] = {}
    for m in inputs:
        if m.key() in stranded_keys:
            places.setdefault(m.key(), set()).add(m.partition())
    assert all(len(partitions) == 1 for partitions in places.values()), places

    # Predicted as offline onnxruntime scores them on the features as Redis holds them now.
    from streamserve.pipeline.decode import load_schema

    schema = load_schema(s.output.schema_path)
    scores = {}
    for m in read_all(pipe.bootstrap, s.output.topic):
        prediction = decode_prediction(schema, m.value())
        scores[prediction["event_id"]] = prediction["score"]
    expected, _ = offline_scores(models["v1"], offline_features(stranded, redis_client, pipe.prefix))
    np.testing.assert_allclose([scores[e["event_id"]] for e in stranded], expected, rtol=0, atol=1e-6)


def test_replay_can_score_dead_letters_directly(
    pipeline_factory: Any, models: dict[str, TrainedModel], entities: Entities, redis_client: redis.Redis
) -> None:
    """--score: no worker involved; predictions of the live version to the output topic, what still fails back to
    the DLQ as a new dead letter."""
    from streamserve.pipeline.deadletter import dead_letter
    from streamserve.pipeline.decode import load_schema
    from streamserve.records import Rejected, Source

    pipe: Pipeline = pipeline_factory(partitions=1)
    s = pipe.settings
    events = list(make_events(entities, 12, seed=53))
    for i, event in enumerate(events):
        event["merchant_id"] = f"merchant-fixed-{i % 2}"
    schema = load_schema(s.input.schema_path)
    producer = Producer({"bootstrap.servers": pipe.bootstrap})
    for offset, event in enumerate(events):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, event)
        original = Source(s.input.topic, 0, offset, event["card_id"].encode(), buffer.getvalue(), [("h", b"1")], 1)
        key, value, headers = dead_letter(Rejected(original, "features", "FeatureError", "merchant_risk missing"))
        producer.produce(s.output.dead_letter_topic, value, key, headers=headers)
    assert producer.flush(30) == 0
    redis_client.hset(f"{pipe.prefix}:merchant:merchant-fixed-0", mapping={"risk_score": 0.3})  # -1 stays missing

    out = _cli(pipe, "replay", "--score")
    assert f"replayed {len(events)} of {len(events)} selected" in out
    fixed = [e for e in events if e["merchant_id"] == "merchant-fixed-0"]
    output_schema = load_schema(s.output.schema_path)
    # Written in transactions: read_topic (not read_all) does not wait for the commit markers' offsets.
    written = read_topic(pipe.bootstrap, s.output.topic, len(fixed))
    predicted = {str(p["event_id"]): p for p in (decode_prediction(output_schema, m.value()) for m in written)}
    assert set(predicted) == {e["event_id"] for e in fixed}
    expected, _ = offline_scores(models["v1"], offline_features(fixed, redis_client, pipe.prefix))
    np.testing.assert_allclose([predicted[e["event_id"]]["score"] for e in fixed], expected, rtol=0, atol=1e-6)
    assert [p["source_offset"] for p in predicted.values()] == [events.index(e) for e in fixed]
    dead_letters = len(events) + len(events) - len(fixed)  # the first ones, and the ones that failed again
    assert len(read_topic(pipe.bootstrap, s.output.dead_letter_topic, dead_letters)) == dead_letters
