"""The benchmark's fixed inputs: the local stack, the models, the entity features, the pre-produced events."""

from __future__ import annotations

import io
import logging
import os
import pickle
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fastavro
import redis
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from streamserve.demo.data import CARD_FIELDS, MERCHANT_FIELDS, Entities, make_entities, make_events
from streamserve.demo.train import train_versions
from streamserve.ops.admin import TopicSpec, ensure_topics
from streamserve.ops.tools import load_features, load_packed_features
from streamserve.pipeline.decode import load_schema

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "schemas"
# Every topic of the benchmark stamps records with the broker's clock when it appends them, so an
# end-to-end latency is (output append time - input append time), both read from one clock.
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}
EVENT_SEED = 11  # event ids are f"e11-{i:08d}": a 4-byte prefix the load generator can swap per round


@dataclass(frozen=True)
class Stack:
    """Where the broker and Redis are, and their server pids when the local stack runs them."""

    bootstrap: str
    redis_url: str
    server_pids: dict[str, int]


def find_stack(state_dir: Path | None = None) -> Stack:
    """Servers from $KAFKA_BOOTSTRAP_SERVERS/$REDIS_URL, else from scripts/stack's stack.env
    (in $STREAMSERVE_STACK_DIR or .stack/, as scripts/stack keeps it)."""
    state_dir = state_dir or Path(os.environ.get("STREAMSERVE_STACK_DIR") or REPO / ".stack")
    values = dict(os.environ)
    env_file = state_dir / "stack.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            name, _, value = line.partition("=")
            values.setdefault(name.strip(), value.strip())
    if "KAFKA_BOOTSTRAP_SERVERS" not in values or "REDIS_URL" not in values:
        raise SystemExit("no Kafka/Redis: run `python3 scripts/stack up` or set KAFKA_BOOTSTRAP_SERVERS and REDIS_URL")
    pids = {}
    for server in ("kafka", "redis"):
        pid_file = state_dir / f"{server}.pid"
        if pid_file.is_file():
            pids[server] = int(pid_file.read_text().strip())
    return Stack(values["KAFKA_BOOTSTRAP_SERVERS"], values["REDIS_URL"], pids)


@dataclass(frozen=True)
class Dataset:
    """Everything every scenario reads: the same events, features and model."""

    run_id: str
    stack: Stack
    events_topic: str
    partitions: int
    payloads: list[tuple[bytes, bytes]]
    payload_file: Path
    key_prefix: str
    """Prefix of the entity hashes (the hash layout)."""
    packed_prefix: str
    """Prefix of the same entities as packed float32 vectors (the packed layout)."""
    models: dict[str, Path]
    entities: Entities

    def topic(self, name: str) -> str:
        """A topic name of this run."""
        return f"bench-{self.run_id}-{name}"

    def create_topics(self, *names: str, partitions: int | None = None) -> None:
        """Create topics of this run with LogAppendTime timestamps."""
        ensure_topics(
            {"bootstrap.servers": self.stack.bootstrap},
            [TopicSpec(name, partitions or self.partitions, dict(LOG_APPEND_TIME)) for name in names],
        )


def encode_events(entities: Entities, count: int) -> list[tuple[bytes, bytes]]:
    """(key, schemaless Avro value) of `count` demo card transactions."""
    schema = load_schema(SCHEMAS / "card_transaction.avsc")
    encoded = []
    buffer = io.BytesIO()
    for event in make_events(entities, count, seed=EVENT_SEED):
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schema, event)
        encoded.append((event["card_id"].encode(), buffer.getvalue()))
    return encoded


def produce_payloads(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    """Write pre-encoded records with confluent-kafka's batch API and wait for every acknowledgement."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "partitioner": "murmur2_random"})
    failures: list[str] = []

    def on_delivery(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for start in range(0, len(payloads), 5000):
        batch = [{"key": k, "value": v} for k, v in payloads[start : start + 5000]]
        while batch:
            queued = producer.produce_batch(topic, batch, on_delivery=on_delivery)
            if queued == len(batch):
                break
            batch = [{"key": m["key"], "value": m["value"]} for m in batch if "_error" in m]
            producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) or failures:
        raise RuntimeError(f"pre-producing events failed: {failures[:3]}")


def load_entities(client: redis.Redis, entities: Entities, prefix: str) -> None:
    """The demo's card and merchant features as Redis hashes under `prefix`."""
    cards = ({"card_id": card_id, **values} for card_id, values in entities.cards.items())
    merchants = ({"merchant_id": merchant_id, **values} for merchant_id, values in entities.merchants.items())
    load_features(
        client,
        ({k: v for k, v in row.items() if k in ("card_id", *CARD_FIELDS, "updated_at")} for row in cards),
        f"{prefix}card:{{card_id}}",
    )
    load_features(
        client,
        ({k: v for k, v in row.items() if k in ("merchant_id", *MERCHANT_FIELDS)} for row in merchants),
        f"{prefix}merchant:{{merchant_id}}",
    )


def load_packed_entities(client: redis.Redis, entities: Entities, prefix: str) -> None:
    """The same features as packed float32 vectors (card: CARD_FIELDS in order; merchant: MERCHANT_FIELDS)."""
    cards = ({"card_id": card_id, **values} for card_id, values in entities.cards.items())
    merchants = ({"merchant_id": merchant_id, **values} for merchant_id, values in entities.merchants.items())
    load_packed_features(client, cards, f"{prefix}card:{{card_id}}", list(CARD_FIELDS))
    load_packed_features(client, merchants, f"{prefix}merchant:{{merchant_id}}", list(MERCHANT_FIELDS))


def prepare(stack: Stack, out_dir: Path, count: int, partitions: int) -> Dataset:
    """Train the models, load the features, pre-produce the events."""
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:4]
    entities = make_entities()
    started = time.monotonic()
    models = {m.version: m.path for m in train_versions(entities, out_dir / "models")}
    log.info("trained models v1, v2 in %.1fs", time.monotonic() - started)

    prefix, packed_prefix = f"bench-{run_id}:", f"bench-{run_id}-packed:"
    client = redis.Redis.from_url(stack.redis_url)
    load_entities(client, entities, prefix)
    load_packed_entities(client, entities, packed_prefix)
    client.close()

    payloads = encode_events(entities, count)
    payload_file = out_dir / "payloads.pickle"
    payload_file.write_bytes(pickle.dumps(payloads, protocol=pickle.HIGHEST_PROTOCOL))
    dataset = Dataset(
        run_id=run_id,
        stack=stack,
        events_topic=f"bench-{run_id}-events",
        partitions=partitions,
        payloads=payloads,
        payload_file=payload_file,
        key_prefix=prefix,
        packed_prefix=packed_prefix,
        models=models,
        entities=entities,
    )
    dataset.create_topics(dataset.events_topic)
    started = time.monotonic()
    produce_payloads(stack.bootstrap, dataset.events_topic, payloads)
    log.info("pre-produced %d events to %s in %.1fs", count, dataset.events_topic, time.monotonic() - started)
    return dataset


def cleanup_redis(stack: Stack, run_id: str) -> None:
    """Delete the run's Redis keys."""
    client = redis.Redis.from_url(stack.redis_url)
    keys = list(client.scan_iter(f"bench-{run_id}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


def delete_topics(stack: Stack, run_id: str) -> None:
    """Remove every topic of the run (they hold hundreds of thousands of records)."""
    admin = AdminClient({"bootstrap.servers": stack.bootstrap})
    topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"bench-{run_id}-")]
    if topics:
        for future in admin.delete_topics(topics, operation_timeout=30).values():
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - best effort clean-up, report and go on
                log.warning("could not delete a topic: %s", exc)
