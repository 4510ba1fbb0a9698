"""Reading a run's topics back and turning broker timestamps into latency, CPU and memory figures."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from bench.procs import Sample, watermarks


def first_string(value: bytes, nullable: bool = False) -> bytes:
    """The first field of an Avro record: a string (the input's event_id), or with ``nullable`` a
    ["null", "string"] union (the prediction's event_id), whose branch index comes first."""
    shift = result = position = 0
    if nullable and value[:1] == b"\x02":  # branch 1 of the union; anything else reads as a plain string
        position = 1  # (the passthrough copies input records; event ids are longer than one character)
    while True:
        byte = value[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    length = (result >> 1) ^ -(result & 1)
    return value[position : position + length]


@dataclass
class TopicRecords:
    """The records of a topic: first string field (event id), broker timestamp, and optionally the values."""

    ids: list[bytes]
    timestamps_ms: np.ndarray
    values: list[bytes] | None = None


def read_topic(
    bootstrap: str, topic: str, partitions: int, keep_values: bool = False, predictions: bool = False
) -> TopicRecords:
    """Every record of a topic, read from the beginning to the high watermark of each partition."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    ends = {}
    for p in range(partitions):
        low, high = watermarks(consumer, TopicPartition(topic, p))
        if high > low:
            ends[p] = high
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    ids: list[bytes] = []
    stamps: list[int] = []
    values: list[bytes] = []
    remaining = set(ends)
    while remaining:
        for msg in consumer.consume(10_000, 1.0):
            if msg.error() is not None:
                continue
            value = msg.value() or b""
            ids.append(first_string(value, nullable=predictions))
            stamps.append(msg.timestamp()[1])
            if keep_values:
                values.append(value)
            if msg.offset() + 1 >= ends[msg.partition()]:
                remaining.discard(msg.partition())
    consumer.close()
    return TopicRecords(ids, np.asarray(stamps, dtype=np.int64), values if keep_values else None)


def _growth(samples: list[Sample], attribute: str, start_ms: float, end_ms: float) -> float:
    """How much a cumulative reading of the samples grew between two wall-clock times (interpolated)."""
    walls = np.array([s.wall_ms for s in samples])
    series = np.array([getattr(s, attribute) for s in samples])
    return float(np.interp(end_ms, walls, series) - np.interp(start_ms, walls, series))


def usage_in_window(samples: list[Sample], start_ms: float, end_ms: float) -> tuple[float, float, int]:
    """(CPU seconds of the scenario, CPU seconds of broker+Redis, peak RSS) between two wall-clock times,
    interpolating the periodic samples."""
    peak = max((s.rss_bytes for s in samples), default=0)
    return _growth(samples, "cpu_s", start_ms, end_ms), _growth(samples, "server_cpu_s", start_ms, end_ms), peak


def contention_in_window(samples: list[Sample], start_ms: float, end_ms: float) -> tuple[float, float]:
    """(cores' worth of the scenario's run-queue wait, cores the whole machine was busy) between two times."""
    seconds = max((end_ms - start_ms) / 1000, 1e-9)
    return (
        _growth(samples, "wait_s", start_ms, end_ms) / seconds,
        _growth(samples, "busy_s", start_ms, end_ms) / seconds,
    )


@dataclass
class Latency:
    """End-to-end latency percentiles over the matched events, in milliseconds."""

    p50: float
    p95: float
    p99: float
    max: float
    matched: int
    offered: int

    @classmethod
    def of(cls, latencies_ms: np.ndarray, offered: int) -> Latency:
        if len(latencies_ms) == 0:
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0, offered)
        p50, p95, p99 = np.percentile(latencies_ms, [50, 95, 99])
        return cls(float(p50), float(p95), float(p99), float(latencies_ms.max()), len(latencies_ms), offered)


def match_latencies(
    inputs: TopicRecords, outputs: TopicRecords, start_ms: float, end_ms: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Latency (output append time - input append time) of every input appended in [start, end), by event id;
    the first output of an event counts (at-least-once duplicates are ignored).
    Returns (input append times, latencies) of the matched events and the number of inputs in the window."""
    appended = {}
    for event_id, ts in zip(inputs.ids, inputs.timestamps_ms.tolist(), strict=True):
        if start_ms <= ts < end_ms:
            appended[event_id] = ts
    first_out: dict[bytes, int] = {}
    for event_id, ts in zip(outputs.ids, outputs.timestamps_ms.tolist(), strict=True):
        if event_id in appended and (event_id not in first_out or ts < first_out[event_id]):
            first_out[event_id] = ts
    sent = np.array([appended[e] for e in first_out], dtype=np.int64)
    latency = np.array([first_out[e] - appended[e] for e in first_out], dtype=np.float64)
    return sent, latency, len(appended)
