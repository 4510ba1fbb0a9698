"""Open-loop load generator: replays the benchmark's pre-encoded events at a fixed rate, in its own process.

    python -m bench.loadgen --bootstrap H:P --topic T --payloads F --rate 5000 --seconds 12

The events are the pre-produced ones, byte for byte, except the 4-byte prefix of their event id
("e11-"), which becomes "rNN-" on the NN-th pass over the set so ids stay unique within a topic.
Prints one JSON line: events sent, seconds taken, the rate reached.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

from confluent_kafka import Producer

ID_PREFIX = slice(1, 5)  # byte 0 is the id's length (zigzag 12 = 0x18), bytes 1-4 the prefix "e11-"


def relabel(value: bytes, tag: bytes) -> bytes:
    """The same event with another 4-byte event-id prefix."""
    return value[: ID_PREFIX.start] + tag + value[ID_PREFIX.stop :]


TICK_S = 0.002
"""The generator sends what is due every 2 ms (~50 records at 25k/s)."""


def _send(producer: Producer, topic: str, payloads: list[tuple[bytes, bytes]], start: int, stop: int) -> int:
    """Queue records start..stop-1 of the replay (waiting while librdkafka's queue is full); returns stop."""
    batch = []
    for i in range(start, stop):
        key, value = payloads[i % len(payloads)]
        batch.append({"key": key, "value": relabel(value, b"r%02d-" % (i // len(payloads)))})
    stuck_since = time.monotonic()
    while batch:
        queued = producer.produce_batch(topic, batch)
        if queued == len(batch):
            break
        errors = {str(m["_error"]) for m in batch if "_error" in m}
        if queued:
            stuck_since = time.monotonic()
        elif time.monotonic() - stuck_since > 10:
            sys.exit(f"load generator: nothing could be queued for 10 s: {sorted(errors)[:3]}")
        batch = [{"key": m["key"], "value": m["value"]} for m in batch if "_error" in m]
        producer.poll(0.01)
    return stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--payloads", type=Path, required=True)
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()

    payloads: list[tuple[bytes, bytes]] = pickle.loads(args.payloads.read_bytes())
    producer = Producer(
        # linger.ms 5: few produce requests for the shared broker; input latency is measured from the
        # broker's append time, so the generator's own batching is not part of it.
        {"bootstrap.servers": args.bootstrap, "linger.ms": 5, "acks": 1, "partitioner": "murmur2_random"}
    )
    total = int(args.rate * args.seconds)
    sent = 0
    started = time.monotonic()
    while sent < total:
        due = min(total, int((time.monotonic() - started) * args.rate) + 1)
        if due > sent:
            sent = _send(producer, args.topic, payloads, sent, min(due, sent + 5000))
        # Sleep a tick between chunks: a generator that spins (or polls for microseconds) takes the CPU the
        # system under test needs on a shared machine. Records go out in chunks of TICK_S, as linger.ms does.
        producer.poll(0)
        if sent >= due:
            time.sleep(TICK_S)
    elapsed = time.monotonic() - started
    producer.flush(60)
    print(json.dumps({"sent": sent, "seconds": round(elapsed, 3), "rate": round(sent / elapsed, 1)}), flush=True)


if __name__ == "__main__":
    main()
