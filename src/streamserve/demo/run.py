"""`streamserve demo`: train, load features, stream events, show predictions, hot-swap v1 -> v2."""

from __future__ import annotations

import atexit
import csv
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import Consumer, ConsumerGroupState, Producer
from confluent_kafka.admin import AdminClient

from streamserve.config import PipelineSettings, load_settings
from streamserve.control.publish import fleet_status, local_validator, publish
from streamserve.control.reading import acceptance_policy
from streamserve.control.signing import generate, load_private
from streamserve.demo.data import (
    CARD_FIELDS,
    MERCHANT_FIELDS,
    Entities,
    make_entities,
    make_events,
    streamed_counts,
)
from streamserve.demo.quality import (
    QualityMonitor,
    fresh_quality_topic,
    produce_labels,
    summary_lines,
    wait_for_table,
)
from streamserve.demo.train import train_versions
from streamserve.ops.admin import ensure_topics, pipeline_topics
from streamserve.ops.preflight import env_overrides
from streamserve.ops.tools import load_features, produce_avro, read_rows
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from streamserve.wiring import build_worker

log = logging.getLogger(__name__)


def say(text: str) -> None:
    print(text, flush=True)


def _write_entity_files(entities: Entities, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cards, merchants = directory / "cards.csv", directory / "merchants.csv"
    with cards.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["card_id", *CARD_FIELDS, "updated_at"])
        for card_id, values in entities.cards.items():
            writer.writerow([card_id, *(values[f] for f in CARD_FIELDS), int(values["updated_at"])])
    with merchants.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["merchant_id", *MERCHANT_FIELDS])
        for merchant_id, values in entities.merchants.items():
            writer.writerow([merchant_id, *(values[f] for f in MERCHANT_FIELDS)])
    return cards, merchants


class PredictionReader:
    """Reads the output topic in the background and keeps what the summary needs."""

    def __init__(self, settings: PipelineSettings) -> None:
        self.schema = load_schema(settings.output.schema_path)
        self.consumer = Consumer(
            {
                **settings.kafka.common(),
                "group.id": f"demo-reader-{uuid.uuid4()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([settings.output.topic])
        self.by_version: Counter[str] = Counter()
        self.samples: list[dict[str, object]] = []
        self.records: list[dict[str, object]] = []
        self.first_ms: int | None = None
        self.last_ms = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                record = decode_prediction(self.schema, msg.value() or b"")
                self.records.append(record)
                version = str(record["model_version"])
                if self.by_version[version] < 3:
                    self.samples.append(record)
                self.by_version[version] += 1
                ts = msg.timestamp()[1]
                self.first_ms = ts if self.first_ms is None else min(self.first_ms, ts)
                self.last_ms = max(self.last_ms, ts)

    @property
    def total(self) -> int:
        return sum(self.by_version.values())

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = -1
        while self.total < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.total} of {count} predictions after {timeout_s:.0f}s")
            if self.total != last and self.total:
                say(f"  ... {self.total}/{count} predictions")
                last = self.total
            time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.consumer.close()


def fresh_topics(base: PipelineSettings) -> str:
    """A fresh set of topics and group per run (env overrides), so a long-lived local stack never mixes runs."""
    run_id = uuid.uuid4().hex[:6]
    os.environ.update(
        {
            "STREAMSERVE_INPUT__TOPIC": f"{base.input.topic}-{run_id}",
            "STREAMSERVE_OUTPUT__TOPIC": f"{base.output.topic}-{run_id}",
            "STREAMSERVE_OUTPUT__DEAD_LETTER_TOPIC": f"{base.output.dead_letter_topic}-{run_id}",
            "STREAMSERVE_CONTROL__TOPIC": f"{base.control.topic}-{run_id}",
            "STREAMSERVE_CONTROL__STATUS_TOPIC": f"{base.control.status_topic}-{run_id}",
            "STREAMSERVE_KAFKA__GROUP_ID": f"{base.kafka.group_id}-{run_id}",
            "STREAMSERVE_STREAM_FEATURES__APP_ID": f"{base.stream_features.app_id}-{run_id}",
            "STREAMSERVE_LOG_EVERY_S": "0",
        }
    )
    return run_id


def trust_a_new_key(model_dir: Path, run_id: str) -> Path:
    """Signed announcements: a new Ed25519 key that the worker (through the env) trusts, and nothing else."""
    sign_key = model_dir.parent / "keys" / f"demo-{run_id}.pem"
    _, public_line = generate(sign_key)
    os.environ["STREAMSERVE_CONTROL__TRUSTED_KEYS"] = json.dumps([public_line])
    say(f"      signing key {sign_key} (public {public_line[:24]}...) trusted by the worker")
    return sign_key


def publish_validated(settings: PipelineSettings, sign_key: Path, version: str, path: Path, notes: str) -> Any:
    """Announce a version to deploy: validated locally against the pipeline first, then signed."""
    return publish(
        settings.kafka.common(),
        settings.control.topic,
        acceptance_policy(settings.control, settings.model.name),
        version,
        str(path),
        action="deploy",
        notes=notes,
        sign_key=load_private(sign_key),
        validate=local_validator(settings.model, settings.features, report=lambda line: None),
    )


def start_feature_app(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`streamserve features stream` in its own process (faust runs its own event loop), stopped by its PID."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        command = [sys.executable, "-m", "streamserve", "--log-level", "WARNING", "features", "stream", "-c"]
        return subprocess.Popen([*command, str(config)], stdout=log_file, stderr=subprocess.STDOUT)


RATE = 4000.0
"""Events per second the demo streams: a card's transactions come ~0.5 s apart, so the streaming app has folded
a card's earlier ones in by the time the worker scores the next (a burst would outrun it)."""


def wait_consuming(settings: PipelineSettings, timeout_s: float) -> None:
    """Wait until the streaming-features app's consumer group is stable with a member (it reads the input)."""
    group = settings.stream_features.app_id
    admin = AdminClient(settings.kafka.common())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        if description.state == ConsumerGroupState.STABLE and description.members:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the streaming-features app (group {group}) did not join within {timeout_s:.0f}s")


def stop_feature_app(app: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within 30 s (nothing when it has exited)."""
    if app.poll() is not None:
        return
    app.send_signal(signal.SIGTERM)
    try:
        app.wait(30)
    except subprocess.TimeoutExpired:
        app.kill()
        app.wait(10)


def streamed_counts_match(
    client: redis.Redis, app: subprocess.Popen[bytes], produced: list[dict[str, Any]], timeout_s: float
) -> tuple[int, int]:
    """(cards whose streamed count in Redis equals the one computed here from the events, cards), waiting for the
    app to catch up."""
    expected = dict(zip((e["card_id"] for e in produced), streamed_counts(produced), strict=True))  # last wins
    cards = sorted(expected)
    deadline = time.monotonic() + timeout_s
    while True:
        reads = client.pipeline(transaction=False)
        for card in cards:
            reads.hget(f"card_stream:{card}", "txn_count_24h")
        replies = reads.execute()
        matching = sum(float(reply or -1) == expected[card] for card, reply in zip(cards, replies, strict=True))
        if matching == len(cards) or time.monotonic() > deadline or app.poll() is not None:
            return matching, len(cards)
        time.sleep(0.5)


def run_demo(config: Path, events: int, partitions: int) -> int:
    """The whole demo; returns the process exit code."""
    env_overrides()
    base = load_settings(config)
    model_dir = Path(base.model.uri).parent
    started = time.monotonic()

    say(f"[1/6] training fraud models v1 (logistic regression) and v2 (gradient boosting) into {model_dir}")
    entities = make_entities()
    trained = {m.version: m for m in train_versions(entities, model_dir)}
    for m in trained.values():
        say(f"      {m.version}: holdout ROC AUC {m.auc:.3f}  ({m.path.name})")

    run_id = fresh_topics(base)
    fresh_quality_topic(base, run_id)
    sign_key = trust_a_new_key(model_dir, run_id)
    settings = load_settings(config)
    say(f"[2/6] creating topics on {settings.kafka.bootstrap_servers} ({partitions} partitions)")
    ensure_topics(settings.kafka.common(), pipeline_topics(settings, partitions))

    # Started first, so it has joined its group by the time events flow (the worker reads what it writes).
    feature_app = start_feature_app(config, model_dir.parent / "data" / f"features-{run_id}.log")
    atexit.register(stop_feature_app, feature_app)  # also when the demo fails half-way
    monitor = QualityMonitor(config, model_dir.parent / "data" / f"monitor-{run_id}.log")
    atexit.register(monitor.stop)
    say(
        f"[3/6] loading {len(entities.cards)} card and {len(entities.merchants)} merchant feature rows "
        f"into Redis at {settings.redis.url}"
    )
    client = redis.Redis.from_url(settings.redis.url)
    cards_csv, merchants_csv = _write_entity_files(entities, model_dir.parent / "data")
    load_features(client, read_rows(cards_csv), "card:{card_id}")
    load_features(client, read_rows(merchants_csv), "merchant:{merchant_id}")
    # This run's feature app counts from zero: no count of an earlier run on a long-lived stack may be read.
    client.delete(*(f"card_stream:{card_id}" for card_id in entities.cards))

    say("[4/6] streaming the first half; a worker (v1) starts once the streaming-features app has counted it")
    reader = PredictionReader(settings)
    schema = load_schema(settings.input.schema_path)
    first, second = events // 2, events - events // 2
    produced = list(make_events(entities, first, seed=21))
    wait_consuming(settings, timeout_s=60)
    produce_avro(
        settings.kafka.producer_config(), settings.input.topic, schema, produced, settings.input.key_field, rate=RATE
    )
    # The worker reads txn_count_24h from what the app wrote: started before the app has folded an event in, it
    # would score the events of a card the app has not reached yet with the feature's default.
    streamed_counts_match(client, feature_app, produced, timeout_s=60)
    worker = build_worker(settings)
    worker_thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    worker_thread.start()
    bad = Producer(settings.kafka.common())
    for i in range(5):  # a few undecodable records, to show where bad input goes
        bad.produce(settings.input.topic, os.urandom(24), f"bad-{i}".encode())
    bad.flush(10)
    reader.wait_for(first, timeout_s=180)

    say("[5/6] announcing v2 on the control topic and streaming the second half (hot swap, no restart)")
    announced = publish_validated(settings, sign_key, "v2", trained["v2"].path, "demo hot swap")
    say(f"      validated locally, signed by key {announced.key_id}, generation {announced.generation}")
    deadline = time.monotonic() + 60
    while worker.registry.routing.live.version != "v2" and time.monotonic() < deadline:
        time.sleep(0.1)
    # Cards the app has counted already: their streamed count is in Redis when the worker scores them.
    seen = {str(e["card_id"]) for e in produced}
    counted = Entities({card: entities.cards[card] for card in sorted(seen)}, entities.merchants)
    produced += make_events(counted, second, seed=22)
    produce_avro(
        settings.kafka.producer_config(),
        settings.input.topic,
        schema,
        produced[first:],
        settings.input.key_field,
        rate=RATE,
    )
    reader.wait_for(events, timeout_s=180)
    if worker.follower is not None:
        worker.follower.report()  # the status topic now says v2
    fleet = fleet_status(settings.kafka.common(), settings.control.status_topic)
    worker.stop()
    worker_thread.join(timeout=60)
    reader.close()
    matching, cards = streamed_counts_match(client, feature_app, produced, timeout_s=60)
    stop_feature_app(feature_app)
    versions = {str(r["event_id"]): str(r["model_version"]) for r in reader.records}
    labelled = produce_labels(settings, produced, entities, versions)
    table = wait_for_table(settings, monitor, labelled, timeout_s=90)
    monitor.stop()

    stats = worker.stats
    span_s = max((reader.last_ms - (reader.first_ms or reader.last_ms)) / 1000, 1e-3)
    say("[6/6] summary")
    say(f"      events in:        {stats.events_in} ({events} valid + 5 undecodable)")
    say(f"      predictions out:  {reader.total}  by version: {dict(sorted(reader.by_version.items()))}")
    say(f"      dead letters:     {stats.dead_letters}  by stage: {stats.by_stage}")
    say(f"      feature defaults: {stats.missing_defaults} missing, {stats.stale_defaults} stale")
    say(
        f"      throughput:       {reader.total / span_s:,.0f} predictions/s over {span_s:.1f}s "
        "(includes waiting for the producer)"
    )
    for status in fleet:
        say(
            f"      fleet status:     worker {status.worker_id} serves {status.model} {status.serving_version} "
            f"({status.state}, mode {status.mode}) - `streamserve models status` shows this"
        )
    say(
        f"      streamed feature: txn_count_24h of {matching}/{cards} cards in Redis equals the count computed from "
        "the events (`streamserve features stream`, a faust app; the models were trained on the same count)"
    )
    say("      sample predictions:")
    for record in reader.samples[:6]:
        say(
            f"        {record['event_id']}  card={record['key']}  version={record['model_version']}  "
            f"score={record['score']:.4f}  label={record['label']}"
        )
    for line in summary_lines(labelled, events, table, monitor):
        say(line)
    ok = reader.by_version.get("v2", 0) > 0 and reader.total == events and stats.dead_letters == 5 and matching == cards
    ok = ok and stats.missing_defaults == 0 and bool(table)
    say(f"demo {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return 0 if ok else 1
