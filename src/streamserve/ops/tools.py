"""Operator tools behind the CLI: bulk feature loading and the demo load generator."""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import redis
from confluent_kafka import KafkaError, Producer

from streamserve.errors import StreamServeError
from streamserve.pipeline.fields import getter, render_id

log = logging.getLogger(__name__)


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a CSV file, or of a Parquet file when pyarrow is installed."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise StreamServeError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        yield from pq.read_table(path).to_pylist()
        return
    with path.open(newline="") as handle:
        yield from csv.DictReader(handle)


def _write_rows(
    client: redis.Redis,
    rows: Iterable[dict[str, Any]],
    key_template: str,
    write: Callable[..., Any],
    chunk: int,
    on_written: Callable[[int], None] | None = None,
) -> int:
    """Call write(pipeline, key, row) for every row under key_template filled from the row, in pipelined chunks;
    ``on_written`` is told how many rows each chunk wrote (a progress bar)."""
    written = 0
    pipe = client.pipeline(transaction=False)
    for row in rows:
        try:
            key = key_template.format_map(row)
        except KeyError as exc:
            raise StreamServeError(f"key template {key_template!r} needs column {exc}") from exc
        write(pipe, key, row)
        written += 1
        if written % chunk == 0:
            pipe.execute()
            if on_written is not None:
                on_written(chunk)
    pipe.execute()
    if on_written is not None and written % chunk:
        on_written(written % chunk)
    return written


def load_features(
    client: redis.Redis,
    rows: Iterable[dict[str, Any]],
    key_template: str,
    chunk: int = 1000,
    on_written: Callable[[int], None] | None = None,
) -> int:
    """HSET each row under key_template filled from the row; pipelined in chunks. Returns rows written."""
    return _write_rows(
        client,
        rows,
        key_template,
        lambda pipe, key, row: pipe.hset(key, mapping={k: v for k, v in row.items() if v is not None and v != ""}),
        chunk,
        on_written,
    )


def pack_vector(row: dict[str, Any], fields: list[str]) -> bytes:
    """A row's fields as a little-endian float32 vector (the packed feature layout); missing values are NaN."""
    try:
        return np.array(
            [math.nan if row.get(name) in (None, "") else float(row[name]) for name in fields], dtype="<f4"
        ).tobytes()
    except ValueError as exc:
        raise StreamServeError(f"row {row!r} has a value that is not a number: {exc}") from exc


def load_packed_features(
    client: redis.Redis,
    rows: Iterable[dict[str, Any]],
    key_template: str,
    fields: list[str],
    chunk: int = 1000,
    on_written: Callable[[int], None] | None = None,
) -> int:
    """SET one packed float32 vector per row (a feature's ``index`` is its position in `fields`). Returns rows."""
    return _write_rows(
        client, rows, key_template, lambda pipe, key, row: pipe.set(key, pack_vector(row, fields)), chunk, on_written
    )


def _pace(producer: Producer, ahead_s: float) -> None:
    """Wait (serving delivery reports) while the producer is ahead of its rate."""
    if ahead_s > 0:
        producer.poll(ahead_s)


STUCK_AFTER_S = 20.0
"""produce_avro: records not acknowledged this long after the last one was produced count as stuck."""
STUCK_RETRIES = 3


def produce_avro(
    producer_config: dict[str, Any],
    topic: str,
    schema: fastavro.types.Schema,
    records: Iterable[dict[str, Any]],
    key_field: str,
    rate: float | None = None,
    headers: Callable[[], list[tuple[str, str | bytes | None]]] | None = None,
    on_produced: Callable[[int], None] | None = None,
) -> int:
    """Produce schemaless Avro records keyed by the key_field path, at most `rate` per second when given;
    `headers` gives each record its headers (a traceparent); `on_produced` is told of every 100 records handed
    to the producer (a progress bar)."""
    # Metadata refreshed every 5 s (librdkafka's default is 5 min): after a broker restart a producer was seen
    # holding every record for minutes on "new leader-1 not found in cache", until a periodic refresh.
    defaults = {"linger.ms": 20, "enable.idempotence": True, "topic.metadata.refresh.interval.ms": 5000}
    config = {**defaults, **producer_config}
    producer = Producer(config)
    failures: list[str] = []
    purged: list[tuple[bytes | None, bytes]] = []

    def on_delivery(err: Any, msg: Any) -> None:
        if err is None:
            return
        if err.code() == KafkaError._PURGE_QUEUE:  # never sent: produced again below
            purged.append((msg.key(), msg.value()))
        else:
            failures.append(str(err))

    started = time.monotonic()
    buffer = io.BytesIO()
    sent = 0
    key_of = getter(key_field)
    for record in records:
        if rate:
            _pace(producer, sent / rate - (time.monotonic() - started))
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schema, record)
        while True:
            try:
                key = render_id(key_of(record))
                encoded_key = key and key.encode()
                if headers is None:
                    producer.produce(topic, buffer.getvalue(), encoded_key, on_delivery=on_delivery)
                else:
                    producer.produce(topic, buffer.getvalue(), encoded_key, on_delivery=on_delivery, headers=headers())
                break
            except BufferError:
                producer.poll(0.1)
        sent += 1
        if on_produced is not None and sent % 100 == 0:
            on_produced(100)
        producer.poll(0)
    if on_produced is not None and sent % 100:
        on_produced(sent % 100)
    unsent = _flush_resending_stuck(producer, config, topic, on_delivery, purged)
    if unsent or failures:
        raise StreamServeError(f"{len(failures) + unsent} events not acknowledged: {failures[:3] or 'still queued'}")
    return sent


def _flush_resending_stuck(
    producer: Producer,
    config: dict[str, Any],
    topic: str,
    on_delivery: Callable[[Any, Any], None],
    purged: list[tuple[bytes | None, bytes]],
) -> int:
    """Wait for every record's acknowledgement, producing again (up to STUCK_RETRIES times) the ones never sent;
    on_delivery collects purged records into `purged`. Returns how many are still queued."""
    unsent: int = producer.flush(STUCK_AFTER_S)
    for _ in range(STUCK_RETRIES):
        if not unsent:
            break
        # Records still queued after a broker restart: librdkafka can keep an unknown partition leader for minutes
        # ("new leader-1 not found in cache", librdkafka #4976). The ones never sent are taken out of the queue
        # and produced again by a new producer (in-flight records are left to finish: resending them could
        # duplicate them).
        log.warning("%d records still queued after %.0fs: producing the unsent ones again", unsent, STUCK_AFTER_S)
        purged.clear()
        producer.purge(in_queue=True, in_flight=False)
        producer.flush(STUCK_AFTER_S)  # serves the purged records' reports, and lets in-flight ones finish
        producer = Producer(config)
        for key_bytes, value in list(purged):
            producer.produce(topic, value, key_bytes, on_delivery=on_delivery)
        unsent = producer.flush(STUCK_AFTER_S)
    return unsent
