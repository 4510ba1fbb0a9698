"""`streamserve features stream` end to end: a faust app on the real Kafka and Redis, checked against pandas.

The aggregates in Redis must equal a reference computed here from the same events with pandas (the definition:
per entity, each aggregate over the window that holds the entity's latest event time and started first), also
after the app is killed with SIGKILL mid-stream and started again; bad events are dead-lettered with a reason;
and a worker scoring from those aggregates gives what onnxruntime gives on features rebuilt here.
"""

from __future__ import annotations

import io
import json
import math
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pandas as pd
import pytest
import redis
import yaml
from confluent_kafka import Producer

from streamserve.config import config_from, load_settings
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.streaming.store import AggregateStore, Entry
from tests.integration.harness import (
    EXAMPLE_PIPELINE,
    Pipeline,
    WorkerThread,
    create_pipeline_topics,
    headers_of,
    offline_features,
    offline_scores,
    predictions,
    produce_events,
    read_topic,
    unique,
    wait_until,
)
from tests.integration.servers import Servers

START_MS = 1_700_000_000_000

READING = {
    "type": "record",
    "name": "Reading",
    "namespace": "test.streamfeatures",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "account", "type": ["null", "string"]},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["DEBIT", "CREDIT", "REFUND"]}},
        {"name": "amount", "type": ["null", "double"]},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}
HASH_AGGREGATES = [  # (name, function, field, window_s, hop_s)
    ("n_10s", "count", None, 10, None),
    ("sum_30s", "sum", "amount", 30, 10),
    ("mean_30s", "mean", "amount", 30, 10),
    ("min_20s", "min", "amount", 20, None),
    ("max_20s", "max", "amount", 20, 5),
    ("kinds_30s", "distinct_count", "kind", 30, 10),
]
PACKED_AGGREGATES = [("n_5s", "count", None, 5, None), ("sum_10s", "sum", "amount", 10, 5)]


class FeatureApp:
    """`streamserve features stream` as a user starts it; stopped or killed by its PID."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamserve", "features", "stream", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"features app exited with {self.process.returncode}:\n{self.log_tail()}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


def aggregate_spec(key: str, name: str, function: str, field: str | None, window: int, hop: int | None) -> dict:
    return {"name": name, "key": key, "function": function, "field": field, "window_s": window, "hop_s": hop}


# --- the reference: pandas over the same events ---------------------------------------------------------------


def feeds(event: dict[str, Any], function: str, field: str | None) -> bool:
    return event["account"] is not None and (function == "count" or event[field] is not None)


def reference(events: list[dict[str, Any]], aggregates: list[tuple]) -> dict[str, dict[str, float | None]]:
    """Per entity, every aggregate over the window that holds its latest event time and started first."""
    rows = [e for e in events if any(feeds(e, a[1], a[2]) for a in aggregates)]
    frame = pd.DataFrame(rows)
    expected: dict[str, dict[str, float | None]] = {}
    for account, group in frame.groupby("account"):
        latest = int(group["ts"].max())
        values: dict[str, float | None] = {"updated_at": float(latest)}
        for name, function, field, window_s, hop_s in aggregates:
            size, hop = window_s * 1000, (hop_s or window_s) * 1000
            start = ((latest - size) // hop) * hop + hop
            inside = group[(group["ts"] >= start) & (group["ts"] < start + size)]
            if field is not None:
                inside = inside[inside[field].notna()]
            if function == "count":
                values[name] = float(len(inside))
            elif function == "distinct_count":
                values[name] = float(inside[field].nunique())
            elif inside.empty:
                values[name] = 0.0 if function == "sum" else None
            else:
                values[name] = float(getattr(inside[field], function)())
        expected[str(account)] = values
    return expected


def redis_hashes(client: redis.Redis, template: str, accounts: list[str]) -> dict[str, dict[str, float]]:
    reads = client.pipeline(transaction=False)
    for account in accounts:
        reads.hgetall(template.format(account=account))
    return {
        account: {k.decode(): float(v) for k, v in reply.items()}
        for account, reply in zip(accounts, reads.execute(), strict=True)
    }


def hash_mismatches(found: dict[str, dict[str, float]], expected: dict[str, dict[str, float | None]]) -> list[str]:
    problems = []
    for account, values in expected.items():
        for name, value in values.items():
            got = found[account].get(name)
            if value is None:
                ok = got is None
            else:
                ok = got is not None and math.isclose(got, value, rel_tol=1e-12, abs_tol=1e-9)
            if not ok:
                problems.append(f"{account}.{name}: redis {got} != pandas {value}")
    return problems


def packed_mismatches(client: redis.Redis, template: str, expected: dict[str, dict[str, float | None]]) -> list[str]:
    accounts = list(expected)
    vectors = client.mget([template.format(account=a) for a in accounts])
    problems = []
    for account, raw in zip(accounts, vectors, strict=True):
        vector = np.frombuffer(raw or b"", dtype="<f4")
        want = np.array([expected[account]["n_5s"], expected[account]["sum_10s"]], dtype=np.float32)
        if vector.shape != (2,) or not np.allclose(vector, want, rtol=1e-6):
            problems.append(f"{account}: packed {vector} != {want}")
    return problems


# --- data unlike the demo's --------------------------------------------------------------------------------------


def readings(count: int, seed: int) -> list[dict[str, Any]]:
    """Readings of 30 accounts over two minutes, arriving up to 4 s out of order; some null amounts and accounts."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.integers(0, 120_000, count)) + START_MS
    arrival = np.argsort(times + rng.integers(0, 4_000, count), kind="stable")
    events = []
    for i in arrival:
        account = None if rng.random() < 0.02 else f"acct-é{int(rng.integers(30)):02d}"
        amount = None if rng.random() < 0.05 else round(float(rng.normal(40, 25)), 2)
        kind = ["DEBIT", "CREDIT", "REFUND"][int(rng.integers(3))]
        events.append({"id": f"r{seed}-{i}", "account": account, "kind": kind, "amount": amount, "ts": int(times[i])})
    return events


def produce_readings(bootstrap: str, topic: str, events: list[dict[str, Any]], garbage: int = 0) -> None:
    schema = fastavro.parse_schema(READING)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for event in events:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, event)
        key = None if event["account"] is None else event["account"].encode()
        producer.produce(topic, buffer.getvalue(), key)
    for i in range(garbage):
        producer.produce(topic, b"\xff\x00 not avro " + bytes([i]), b"acct-\xc3\xa900")
    assert producer.flush(30) == 0


@pytest.fixture
def reading_pipeline(
    stack: Servers, bootstrap: str, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[dict[str, Any]]:
    name = unique("sf")
    schema_path = tmp_path / "reading.avsc"
    schema_path.write_text(json.dumps(READING))
    hash_key, packed_key = f"{name}:acct:{{account}}", f"{name}:vec:{{account}}"
    aggregates = [aggregate_spec(hash_key, *a) for a in HASH_AGGREGATES]
    aggregates += [
        {**aggregate_spec(packed_key, *a), "layout": "packed", "index": i} for i, a in enumerate(PACKED_AGGREGATES)
    ]
    config = config_from(
        EXAMPLE_PIPELINE,
        {
            "input": {
                "topic": f"{name}-in",
                "schema": str(schema_path),
                "key_field": "account",
                "event_id_field": "id",
                "event_time_field": "ts",
            },
            "output.topic": f"{name}-out",
            "output.dead_letter_topic": f"{name}-dlq",
            "kafka.bootstrap_servers": bootstrap,
            "redis.url": stack.redis_url,
            "stream_features": {
                "app_id": f"{name}-app",
                "aggregates": aggregates,
                "commit_interval_s": 0.5,
                "session_timeout_s": 6,
            },
            "log_every_s": 1.0,
        },
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    settings = load_settings(path)
    create_pipeline_topics(bootstrap, settings, partitions=3)
    yield {"path": path, "settings": settings, "hash_key": hash_key, "packed_key": packed_key, "name": name}
    keys = list(redis_client.scan_iter(f"{name}:*", count=1000))
    if keys:
        redis_client.delete(*keys)


def test_aggregates_equal_pandas_across_a_sigkill_and_bad_events_are_dead_lettered(
    reading_pipeline: dict[str, Any], bootstrap: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    settings = reading_pipeline["settings"]
    hash_key, packed_key = reading_pipeline["hash_key"], reading_pipeline["packed_key"]
    events = readings(1200, seed=5)
    first, second = events[:600], events[600:]
    all_aggregates = HASH_AGGREGATES + PACKED_AGGREGATES

    def converged(upto: list[dict[str, Any]], app: FeatureApp) -> bool:
        app.assert_alive()
        expected = reference(upto, HASH_AGGREGATES)
        found = redis_hashes(redis_client, hash_key, list(expected))
        return not hash_mismatches(found, expected)

    produce_readings(bootstrap, settings.input.topic, first, garbage=3)
    app = FeatureApp(reading_pipeline["path"], tmp_path / "features-1.log")
    try:
        wait_until(lambda: converged(first, app), 60, "the aggregates of the first 600 readings in Redis")
        before = reference(first, all_aggregates)
        produce_readings(bootstrap, settings.input.topic, second)

        def moved_on() -> bool:
            app.assert_alive()
            stamps = redis_client.pipeline(transaction=False)
            for account in before:
                stamps.hget(hash_key.format(account=account), "updated_at.events")
            return any(int(n or 0) > 0 for n in stamps.execute()) and any(
                float(redis_client.hget(hash_key.format(account=a), "updated_at") or 0) > before[a]["updated_at"]
                for a in before
            )

        wait_until(moved_on, 60, "the app folding in the second half")
        app.kill()  # mid-stream: offsets of the last steps may not be committed, the changelog may lead them
    finally:
        app.stop()

    app = FeatureApp(reading_pipeline["path"], tmp_path / "features-2.log")
    try:
        wait_until(lambda: converged(events, app), 90, "the aggregates of all 1200 readings after the restart")
        expected = reference(events, HASH_AGGREGATES)
        problems = hash_mismatches(redis_hashes(redis_client, hash_key, list(expected)), expected)
        problems += packed_mismatches(redis_client, packed_key, reference(events, all_aggregates))
        assert not problems, problems[:10]
        # A packed vector's stamp lives beside it.
        some = next(iter(expected))
        assert float(redis_client.hget(packed_key.format(account=some) + "#stamp", "updated_at")) == pytest.approx(
            expected[some]["updated_at"]
        )
    finally:
        assert app.stop() == 0, app.log_tail()

    # Bad events: 3 undecodable, the null accounts, the null amounts (these still count where they can).
    bad_ids = {e["id"] for e in events if e["account"] is None or e["amount"] is None}
    dead = read_topic(bootstrap, settings.output.dead_letter_topic, len(bad_ids) + 3, timeout_s=30)
    stages: dict[str, int] = {}
    reasons: dict[str, str] = {}
    schema = fastavro.parse_schema(READING)
    for msg in dead:
        headers = headers_of(msg)
        stage = headers["streamserve.dlq.stage"].decode()
        stages[stage] = stages.get(stage, 0) + 1
        if stage == "aggregate":
            event = fastavro.schemaless_reader(io.BytesIO(msg.value()), schema, None)
            reasons[event["id"]] = headers["streamserve.dlq.error.message"].decode()
    assert set(reasons) == bad_ids, "every bad reading dead-lettered (a redelivery may repeat one)"
    assert stages["decode"] >= 3
    for event in events:
        if event["account"] is None:
            assert "entity key" in reasons[event["id"]]
        elif event["amount"] is None:
            assert "field 'amount' is null or missing" in reasons[event["id"]]


# --- the worker scores with them -------------------------------------------------------------------------------


def test_the_worker_scores_with_the_streamed_aggregate(
    pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel], redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The demo's events and model; its txn_count_24h feature read from a streamed count instead of the hash."""
    stream_key = f"{pipeline.prefix}:cstream:{{card_id}}"
    config = yaml.safe_load(pipeline.path.read_text())
    config["stream_features"] = {
        "app_id": f"{pipeline.name}-app",
        "aggregates": [aggregate_spec(stream_key, "txn_count_1h", "count", None, 3600, 600)],
    }
    for feature in config["features"]:
        if feature["name"] == "txn_count_24h":
            feature.update({"key": stream_key, "field": "txn_count_1h", "default": 0.0})
    path = tmp_path / "streamed.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    settings = load_settings(path)

    start = (START_MS // 3_600_000) * 3_600_000
    events = list(make_events(entities, 1500, seed=31, start_ms=start))
    for i, event in enumerate(events):  # two hours of events: the current hour-long window holds only some
        event["event_time"] = start + i * 4800
    produce_events(pipeline, events)
    frame = pd.DataFrame(events)
    latest = frame.groupby("card_id")["event_time"].max()
    window_start = ((latest - 3_600_000) // 600_000) * 600_000 + 600_000
    joined = frame.join(window_start.rename("window_start"), on="card_id")
    counts = joined[joined["event_time"] >= joined["window_start"]].groupby("card_id").size()
    expected = {card: float(counts.get(card, 0)) for card in latest.index}

    app = FeatureApp(path, tmp_path / "features.log")
    try:

        def counted() -> bool:
            app.assert_alive()
            reads = redis_client.pipeline(transaction=False)
            for card in expected:
                reads.hget(stream_key.format(card_id=card), "txn_count_1h")
            return [float(v or -1) for v in reads.execute()] == list(expected.values())

        wait_until(counted, 60, "the streamed hour counts of every card in Redis")
    finally:
        assert app.stop() == 0, app.log_tail()

    worker = WorkerThread(settings)
    try:
        outputs = predictions(pipeline, len(events))
    finally:
        worker.stop()
    rows = offline_features(events, redis_client, pipeline.prefix)
    rows[:, 4] = [expected[e["card_id"]] for e in events]  # the streamed count, computed here with pandas
    scores, labels = offline_scores(models["v1"], rows)
    by_id = {record["event_id"]: record for _, record in outputs}
    assert len(by_id) == len(events)
    for i, event in enumerate(events):
        record = by_id[event["event_id"]]
        assert record["score"] == pytest.approx(float(scores[i]), abs=1e-6)
        assert record["label"] == labels[i]


def test_an_older_entry_never_replaces_a_newer_one(redis_client: redis.Redis) -> None:
    """The store's compare-and-set: a later event time wins; at the same time, the state with more events."""
    store = AggregateStore(redis_client, "updated_at")
    key, vector = unique("sf-cas"), unique("sf-cas-vec")
    try:

        def write(latest_ms: int, events: int, value: float | None) -> int:
            entries = [Entry(key, latest_ms, events, {"v": value})]
            packed = [Entry(vector, latest_ms, events, {"v": value})]
            return store.write([("hash", {}, entries), ("packed", {"v": 1}, packed)])

        assert write(1000, 5, 5.0) == 0
        assert write(999, 50, 50.0) == 2, "an earlier event time is older, however many events"
        assert write(1000, 4, 4.0) == 2, "the same time with fewer events is older"
        assert redis_client.hget(key, "v") == b"5.0"
        assert write(1000, 6, None) == 0
        assert redis_client.hget(key, "v") is None, "no value (the mean of nothing) deletes the field"
        assert write(2000, 1, 7.0) == 0
        assert redis_client.hmget(key, "v", "updated_at", "updated_at.events") == [b"7.0", b"2000", b"1"]
        elements = np.frombuffer(redis_client.get(vector), dtype="<f4")
        assert np.isnan(elements[0]), "a new vector's other elements read as missing"
        assert elements[1] == 7.0
        assert redis_client.hget(vector + "#stamp", "updated_at") == b"2000"
    finally:
        redis_client.delete(key, vector, vector + "#stamp")


# --- operating it --------------------------------------------------------------------------------------------------


def scrape(log_path: Path) -> dict[str, float]:
    """The app's /metrics (on the port its log names) as {sample name with labels: value}."""
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    found = re.search(r"metrics and health on port (\d+)", log_path.read_text(errors="replace"))
    assert found, "the app did not log its metrics port"
    with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_the_app_exports_what_it_did_on_metrics(
    reading_pipeline: dict[str, Any], bootstrap: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """Events consumed, entries written, writes the compare-and-set refused, dead letters: equal to the counts
    computed here from the events and from what Redis holds."""
    config = yaml.safe_load(reading_pipeline["path"].read_text())
    config["stream_features"]["port"] = 0
    reading_pipeline["path"].write_text(yaml.safe_dump(config, sort_keys=False))
    settings, hash_key = reading_pipeline["settings"], reading_pipeline["hash_key"]
    events = readings(400, seed=13)
    accounts = sorted({e["account"] for e in events if e["account"] is not None})
    # One account's hash already holds a newer entry (a later event time): every write of it must be refused.
    newer = hash_key.format(account=accounts[0])
    redis_client.hset(newer, mapping={"n_10s": 99.0, "updated_at": START_MS + 10**9, "updated_at.events": 1})
    produce_readings(bootstrap, settings.input.topic, events, garbage=2)
    prefix = "streamserve_stream_features"
    app = FeatureApp(reading_pipeline["path"], tmp_path / "features.log")
    try:

        def consumed_all() -> bool:
            app.assert_alive()
            try:
                return scrape(app.log_path).get(f"{prefix}_events_total") == len(events) + 2
            except (AssertionError, OSError):
                return False  # not serving yet

        wait_until(consumed_all, 60, f"{prefix}_events_total to reach {len(events) + 2}")
        samples = scrape(app.log_path)
    finally:
        assert app.stop() == 0, app.log_tail()

    bad = sum(1 for e in events if e["account"] is None or e["amount"] is None)
    assert samples[f"{prefix}_dead_letters_total"] == bad + 2
    assert samples[f"{prefix}_rejections_total{{reason=undecodable}}"] == 2
    assert samples[f"{prefix}_redelivered_total"] == 0
    assert samples[f"{prefix}_redis_errors_total"] == 0
    refused = samples[f"{prefix}_stale_writes_total"]
    assert refused >= 1, "the newer entry's account was written at least once, and refused"
    assert redis_client.hget(newer, "n_10s") == b"99.0", "the newer entry stayed"
    # Every account (hash and packed layouts) was written at least once; the refused writes are among them.
    assert samples[f"{prefix}_aggregates_written_total"] >= 2 * len(accounts)
    assert samples[f"{prefix}_aggregates_written_total"] >= refused
