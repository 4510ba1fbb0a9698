"""Helpers for integration tests: unique topics, pipeline configs, worker processes, reading outputs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fastavro
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import yaml
from confluent_kafka import Consumer, Message

from streamserve.config import PipelineSettings, apply_overrides, config_from, load_settings
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.ops.admin import ensure_topics, pipeline_topics
from streamserve.ops.tools import produce_avro
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from streamserve.wiring import build_worker

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO / "schemas"
EXAMPLE_PIPELINE = REPO / "examples" / "fraud" / "pipeline.yaml"
"""Test pipelines are the demo's pipeline plus overrides, never a retyped copy."""


def unique(prefix: str) -> str:
    """A name no other test (or earlier run) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll a condition with a deadline; fail saying what did not happen."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def read_topic(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float = 60,
    isolation: str = "read_uncommitted",
    settle_s: float = 1.0,
) -> list[Message]:
    """Read a topic from the beginning until `expected` records arrived (then `settle_s` more for extras)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.subscribe([topic])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while True:
            now = time.monotonic()
            if settle_until is None and len(messages) >= expected:
                settle_until = now + settle_s
            if settle_until is not None and now >= settle_until:
                break
            if now > deadline:
                raise AssertionError(f"{topic}: {len(messages)} of {expected} records after {timeout_s:.0f}s")
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is None:
                    messages.append(msg)
    finally:
        consumer.close()
    return messages


def headers_of(msg: Message) -> dict[str, bytes]:
    return {name: value for name, value in (msg.headers() or [])}


def create_pipeline_topics(bootstrap: str, s: PipelineSettings, partitions: int) -> None:
    """A test pipeline's topics, as `streamserve topics create` makes them."""
    ensure_topics({"bootstrap.servers": bootstrap}, pipeline_topics(s, partitions))


@dataclass
class Pipeline:
    """A pipeline config of one test: its own topics, group, Redis key prefix."""

    bootstrap: str
    redis_url: str
    directory: Path
    model_path: Path
    partitions: int = 4
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = field(default_factory=lambda: unique("t"))

    def __post_init__(self) -> None:
        self.prefix = self.name
        card, merchant = f"{self.prefix}:card:{{card_id}}", f"{self.prefix}:merchant:{{merchant_id}}"
        config = config_from(
            EXAMPLE_PIPELINE,
            {
                "input.topic": f"{self.name}-in",
                **{f"features.{name}.key": card for name in ("avg_amount_30d", "txn_count_24h", "chargeback_rate")},
                "features.merchant_risk.key": merchant,
                "features.merchant_risk.default": None,  # no default: a missing merchant is a bad event
                "model": {"uri": str(self.model_path), "version": "v1"},
                "output.topic": f"{self.name}-out",
                "output.dead_letter_topic": f"{self.name}-dlq",
                "kafka": {
                    "bootstrap_servers": self.bootstrap,
                    "group_id": f"{self.name}-group",
                    "consumer": {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500},
                },
                "redis.url": self.redis_url,
                "control": {"topic": f"{self.name}-control", "status_topic": f"{self.name}-status"},
                "log_every_s": 2.0,
            },
        )
        apply_overrides(config, self.overrides)
        self.path = self.directory / f"{self.name}.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.settings: PipelineSettings = load_settings(self.path)

    def create_topics(self) -> None:
        create_pipeline_topics(self.bootstrap, self.settings, self.partitions)


class WorkerProcess:
    """`streamserve run` as a user starts it, in its own process."""

    running: ClassVar[list[WorkerProcess]] = []
    """Every worker started, so a failed test cannot leave one behind (see conftest)."""

    def __init__(self, config: Path, log_dir: Path, worker_id: str) -> None:
        self.log_path = log_dir / f"{worker_id}.log"
        self._log = self.log_path.open("ab")
        env = {**os.environ, "STREAMSERVE_WORKER_ID": worker_id}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamserve", "run", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        WorkerProcess.running.append(self)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"worker exited with {self.process.returncode}:\n{self.log_tail()}"

    def wait_logged(self, text: str, timeout_s: float = 60) -> None:
        def logged() -> bool:
            self.assert_alive()
            return text in self.log_path.read_text(errors="replace")

        wait_until(logged, timeout_s, f"worker log line {text!r}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self, timeout_s: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError(f"worker did not drain within {timeout_s}s:\n{self.log_tail()}") from None
        self._log.close()
        return self.process.returncode


class WorkerThread:
    """An in-process worker (the CLI's `run`, without the signal handlers)."""

    def __init__(self, settings: PipelineSettings) -> None:
        self.worker = build_worker(settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc
            raise

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "worker did not drain within 60s"
        assert self.error is None, f"worker crashed: {self.error!r}"


class Producing(threading.Thread):
    """The load generator's thread; `error` holds what made it fail (an exception in a thread is not raised)."""

    error: BaseException | None = None


def produce_in_background(pipeline: Pipeline, events: list[dict[str, Any]], rate: float) -> Producing:
    """Produce the events at `rate` per second from a thread (join it to wait for the acknowledgements; then
    check its `error`)."""
    s = pipeline.settings
    schema = load_schema(s.input.schema_path)

    def produce() -> None:
        try:
            produce_avro({"bootstrap.servers": pipeline.bootstrap}, s.input.topic, schema, events, s.input.key_field,
                         rate=rate)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - handed to the test through the thread
            thread.error = exc

    thread = Producing(target=produce, daemon=True)
    thread.start()
    return thread


def produce_events(pipeline: Pipeline, events: list[dict[str, Any]]) -> None:
    s = pipeline.settings
    produce_avro(
        {"bootstrap.servers": pipeline.bootstrap},
        s.input.topic,
        load_schema(s.input.schema_path),
        events,
        s.input.key_field,
    )


def offline_features(events: list[dict[str, Any]], client: redis.Redis, prefix: str) -> np.ndarray:
    """The model inputs computed independently of streamserve: straight from the events and Redis."""
    reads = client.pipeline(transaction=False)
    for e in events:
        reads.hgetall(f"{prefix}:card:{e['card_id']}")
        reads.hgetall(f"{prefix}:merchant:{e['merchant_id']}")
    replies = reads.execute()
    rows = []
    for i, e in enumerate(events):
        card, merchant = replies[2 * i], replies[2 * i + 1]
        rows.append(
            [
                e["amount"],
                e["hour_of_day"],
                1.0 if e["is_online"] else 0.0,
                float(card[b"avg_amount_30d"]),
                float(card[b"txn_count_24h"]),
                float(card[b"chargeback_rate"]),
                float(merchant[b"risk_score"]),
            ]
        )
    return np.array(rows, dtype=np.float32)


def offline_scores(model: TrainedModel, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"X": matrix})
    return probabilities[:, 1], labels


def predictions(pipeline: Pipeline, expected: int, timeout_s: float = 120) -> list[tuple[Any, dict[str, Any]]]:
    schema = load_schema(pipeline.settings.output.schema_path)
    messages = read_topic(pipeline.bootstrap, pipeline.settings.output.topic, expected, timeout_s)
    return [(msg, decode_prediction(schema, msg.value())) for msg in messages]


# --- batch scoring: demo events as files, and what offline onnxruntime makes of them -------------------------


def entity_rows(events: list[dict[str, Any]], entities: Entities) -> np.ndarray:
    """The model inputs of demo events rebuilt from the events and the entities loaded into Redis (no streamserve
    code), in the demo pipeline's feature order."""
    return np.array(
        [
            [
                e["amount"],
                e["hour_of_day"],
                1.0 if e["is_online"] else 0.0,
                entities.cards[e["card_id"]]["avg_amount_30d"],
                entities.cards[e["card_id"]]["txn_count_24h"],
                entities.cards[e["card_id"]]["chargeback_rate"],
                entities.merchants[e["merchant_id"]]["risk_score"],
            ]
            for e in events
        ],
        dtype=np.float32,
    )


def demo_events(entities: Entities, count: int, seed: int) -> list[dict[str, Any]]:
    """Demo events with bad ones mixed in: an unknown merchant (no default: features), a NaN amount
    (features), an hour out of int range is not writable, so a null hour (decode) in files only."""
    events = list(make_events(entities, count, seed=seed, start_ms=1_700_000_000_000))
    for i in range(7, count, 97):
        events[i]["merchant_id"] = "merchant-unknown"
    for i in range(11, count, 89):
        events[i]["amount"] = math.nan
    return events


def write_parquet(path: Path, events: list[dict[str, Any]], row_group: int = 20_000) -> None:
    table = pa.Table.from_pylist(events)
    table = table.set_column(
        table.schema.get_field_index("event_time"),
        "event_time",
        pa.array([e["event_time"] for e in events], pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
    )
    pq.write_table(table, path, row_group_size=row_group)


def read_output(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".avro":
        with path.open("rb") as handle:
            return list(fastavro.reader(handle))  # type: ignore[arg-type]
    return pq.read_table(path).to_pylist()


def expected_scores(events: list[dict[str, Any]], entities: Entities, model: TrainedModel) -> dict[str, float]:
    """Offline onnxruntime on the features rebuilt from the events and the entities (no streamserve code)."""
    good = [e for e in events if e["merchant_id"] in entities.merchants and not math.isnan(e["amount"])]
    scores, _ = offline_scores(model, entity_rows(good, entities))
    return {e["event_id"]: float(s) for e, s in zip(good, scores, strict=True)}
