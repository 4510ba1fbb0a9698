"""Microbenchmark: the Python cost of producing predictions, per record, against a real broker.

Run with `python -m bench.produce_bench [bootstrap] [records]` (default 127.0.0.1:39092, 100,000 records) while
the local stack is up. Every variant produces the same keys and values (about the size of a prediction) in
micro-batches of 256 with streamserve's producer settings, serves delivery reports after each batch as the worker
does, and ends with flush().
It reports the main thread's CPU time per record (the produce calls, the size
checks, the header lists and the delivery callbacks; librdkafka's own threads not counted) and the wall time.

Variants (run this module with PYTHONPATH at another checkout's src/ to measure that checkout's sink):
- ``sink, 5 headers``: OutputSink.produce with the headers every prediction carried before output.headers
  (model name and version, source topic, partition and offset: a new list per record).
- ``sink, 1 header``: OutputSink.produce with the default since output.headers (the model version, one list
  shared by the batch, as the encoder now gives it).
- ``sink, 1 header, failures reported only``: the same with ``delivery.report.only.error: true`` (confluent-kafka
  then makes no Message and no Python call for a delivered record). What that would save; the sink does not use
  it, since nothing would then tell that a batch was acknowledged (BENCHMARKS.md).
- ``sink, no headers``: OutputSink.produce with ``output.headers: []``.
- ``produce_batch, no headers``: Producer.produce_batch with one dict per record and one on_delivery for the
  batch (librdkafka still calls it once per record). confluent-kafka 2.16 drops headers in produce_batch, so
  this is only what a headerless configuration could use.
- ``produce(), 1 header, callback`` and ``produce(), callback``: Producer.produce() called directly (no size
  check, no sink), to tell the sink's own cost from the header's and the callback's.
- ``produce(), no callback``: a floor for reference; unsafe (no record's failure would be seen).

First it checks whether produce_batch keeps headers. A last part measures what each header costs on the
broker: it produces the same records with and without each header to fresh topics, uncompressed and lz4, and
compares the sizes of the partitions' log segments.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streamserve.pipeline.encode import (
    HEADER_MODEL_NAME,
    HEADER_MODEL_VERSION,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
)
from streamserve.pipeline.sink import PRODUCER_DEFAULTS, InflightBatch, OutputSink
from streamserve.records import Headers

HEADERS = {
    "model_name": (HEADER_MODEL_NAME, b"fraud"),
    "model_version": (HEADER_MODEL_VERSION, b"v12"),
    "source_topic": (HEADER_SOURCE_TOPIC, b"transactions"),
    "source_partition": (HEADER_SOURCE_PARTITION, b"3"),
    "source_offset": (HEADER_SOURCE_OFFSET, None),
}
"""Each header output.headers may select, with the value it has in this benchmark (the offset: per record)."""

BATCH = 256
REPEATS = 7
VALUE_BYTES = 120
"""About the size of a fraud-demo prediction (schemas/prediction.avsc, no probabilities map)."""


def records(n: int) -> list[tuple[bytes, bytes, int]]:
    """Keys, values and source offsets."""
    return [(f"card-{i % 2000}".encode(), os.urandom(VALUE_BYTES), 1_000_000 + i) for i in range(n)]


def five_headers(offset: int, base: list[tuple[str, bytes]]) -> Any:
    """The headers every prediction carried before output.headers: a new list per record."""
    return [*base, (HEADER_SOURCE_OFFSET, str(offset).encode())]


def run(bootstrap: str, topic: str, n: int, variant: str) -> tuple[float, float]:
    """(main-thread CPU us per record, wall seconds) of producing n records with the variant."""
    data = records(n)
    failures_only = variant.endswith("failures reported only")
    sink = OutputSink({"bootstrap.servers": bootstrap, "delivery.report.only.error": failures_only})
    producer = sink.producer
    failed: list[KafkaError] = []
    base = [
        (HEADER_MODEL_NAME, b"fraud"),
        (HEADER_MODEL_VERSION, b"v12"),
        (HEADER_SOURCE_TOPIC, b"transactions"),
        (HEADER_SOURCE_PARTITION, b"3"),
    ]
    producer.produce(topic, b"warm-up")
    producer.flush(10)
    batches: list[InflightBatch] = []
    cpu, wall = time.thread_time(), time.perf_counter()
    for start in range(0, n, BATCH):
        chunk = data[start : start + BATCH]
        batch = InflightBatch()
        batches.append(batch)
        if variant == "sink, 5 headers":
            for key, value, offset in chunk:
                sink.produce(batch, topic, key, value, five_headers(offset, base))
        elif variant in ("sink, 1 header", "sink, 1 header, failures reported only"):
            shared: Any = [(HEADER_MODEL_VERSION, b"v12")]  # one list per batch, as the encoder now gives it
            for key, value, _ in chunk:
                sink.produce(batch, topic, key, value, shared)
        elif variant == "sink, no headers":
            for key, value, _ in chunk:
                sink.produce(batch, topic, key, value, None)
        elif variant == "produce_batch, no headers":
            messages: list[dict[str, Any]] = [{"key": key, "value": value} for key, value, _ in chunk]
            queued = producer.produce_batch(topic, messages, on_delivery=batch.on_delivery)
            batch.pending += queued
            if queued != len(messages):
                failed += [m["_error"] for m in messages if "_error" in m]
        elif variant == "produce(), 1 header, callback":
            header: Any = [(HEADER_MODEL_VERSION, b"v12")]
            for key, value, _ in chunk:
                producer.produce(topic, value, key, headers=header, on_delivery=batch.on_delivery)
                batch.pending += 1
        elif variant == "produce(), callback":
            for key, value, _ in chunk:
                producer.produce(topic, value, key, on_delivery=batch.on_delivery)
                batch.pending += 1
        elif variant == "produce(), no callback":
            for key, value, _ in chunk:
                producer.produce(topic, value, key)
        else:
            raise ValueError(variant)
        sink.seal(batch)
    remaining = producer.flush(60)
    sink.poll(0)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    errors = [b.error for b in batches if b.error] + failed
    unreported = variant == "produce(), no callback" or failures_only  # nothing tells their batches apart as done
    if remaining or errors or (not unreported and not all(b.done for b in batches)):
        raise RuntimeError(f"{variant}: {remaining} unacknowledged, errors {errors[:3]}")
    return cpu / n * 1e6, wall


VARIANTS = [
    "sink, 5 headers",
    "sink, 1 header",
    "sink, 1 header, failures reported only",
    "sink, no headers",
    "produce_batch, no headers",
    "produce(), 1 header, callback",
    "produce(), callback",
    "produce(), no callback",
]


def create(admin: AdminClient, topic: str, partitions: int = 1) -> None:
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result()


def produce_costs(bootstrap: str, n: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-produce-{uuid.uuid4().hex[:8]}"
    create(admin, topic, 4)
    samples: dict[str, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    try:
        for _ in range(REPEATS):  # interleaved, so that drifting load on the machine hits every variant alike
            for variant in VARIANTS:
                samples[variant].append(run(bootstrap, topic, n, variant))
    finally:
        admin.delete_topics([topic])
    print(f"{n:,} records of {VALUE_BYTES} bytes in batches of {BATCH}, median of {REPEATS} (min-max)")
    print(f"{'variant':<28} {'CPU us/record':>22} {'wall s':>8}")
    for variant, found in samples.items():
        cpu = [c for c, _ in found]
        wall = statistics.median(w for _, w in found)
        print(f"{variant:<28} {statistics.median(cpu):>8.2f} ({min(cpu):.2f}-{max(cpu):.2f}) {wall:>12.2f}")


def header_bytes(bootstrap: str, n: int, data_dir: Path) -> None:
    """Bytes each header adds per record in the broker's log, uncompressed and with lz4."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    data = records(n)
    print(f"\nbytes per record in the broker's log, {n:,} records in batches of {BATCH}")
    print(f"{'headers':<20} {'none':>8} {'lz4':>8}")
    baseline: dict[str, float] = {}
    for selected in [[], *[[name] for name in HEADERS], list(HEADERS)]:
        row = []
        for compression in ("none", "lz4"):
            topic = f"bench-hdr-{uuid.uuid4().hex[:8]}"
            create(admin, topic)
            producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap, "compression.type": compression})
            for start in range(0, n, BATCH):
                for key, value, offset in data[start : start + BATCH]:
                    headers: Headers = [
                        (HEADERS[name][0], HEADERS[name][1] or str(offset).encode()) for name in selected
                    ]
                    producer.produce(topic, value, key, headers=headers, partition=0)
                producer.flush(30)  # one batch per request: the same batching in every row
            size = sum(f.stat().st_size for f in (data_dir / f"{topic}-0").glob("*.log"))
            admin.delete_topics([topic])
            per_record = size / n
            if not selected:
                baseline[compression] = per_record
            row.append(per_record - baseline[compression])
        label = "+".join(selected) or "(no headers)"
        print(f"{label:<20} {row[0]:>+8.1f} {row[1]:>+8.1f}" if selected else f"{label:<20} {'0':>8} {'0':>8}")
    print(f"baseline (no headers): {baseline['none']:.1f} bytes uncompressed, {baseline['lz4']:.1f} with lz4")


def produce_batch_keeps_headers(bootstrap: str) -> bool:
    """Whether Producer.produce_batch delivers a record's headers (confluent-kafka 2.16.1 drops them)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-batch-headers-{uuid.uuid4().hex[:8]}"
    create(admin, topic)
    try:
        producer = Producer({**PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap})
        producer.produce_batch(topic, [{"key": b"k", "value": b"v", "headers": [(HEADER_MODEL_VERSION, b"v12")]}])
        producer.flush(10)
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                consumer.close()
                return bool(msg.headers())
        consumer.close()
        raise RuntimeError(f"the record produced to {topic} was not read back within 30 s")
    finally:
        admin.delete_topics([topic])


if __name__ == "__main__":
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:39092"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    kept = produce_batch_keeps_headers(bootstrap)
    print(f"produce_batch keeps headers (confluent-kafka {confluent_kafka.version()[0]}): {kept}\n")
    produce_costs(bootstrap, n)
    data_dir = Path(os.environ.get("KAFKA_DATA_DIR", Path(__file__).resolve().parents[1] / ".stack" / "kafka-data"))
    if data_dir.is_dir():
        header_bytes(bootstrap, 20_000, data_dir)
    else:
        print(f"\n{data_dir} not found (set KAFKA_DATA_DIR to the broker's log.dirs): header bytes not measured")
