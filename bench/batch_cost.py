"""CPU per micro-batch of one worker by batch size: the fixed cost per batch and the cost per event.

Run with `python -m bench.batch_cost [sizes...]` against the local stack (`python3 scripts/stack up`). A
worker is built as the bench builds it (examples/fraud/pipeline.yaml, hash features in Redis, the demo's model) and
its batch path (decode, features with the Redis round trip, inference, encoding, produce, acknowledgement,
commit) runs on pre-made records of each size; no consumer, so no poll cost. CPU is the whole process's
(librdkafka's threads included). The per-batch fixed cost is what the default max_batch_size weighs against;
the Redis round trip (wall time of the one pipelined fetch per batch) is what overlapping it could win.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.dataset import Dataset, cleanup_redis, encode_events, find_stack, load_entities
from bench.scenarios import streamserve_config
from streamserve.admin import ensure_topics, pipeline_topics
from streamserve.config import load_settings
from streamserve.demo.data import make_entities
from streamserve.demo.train import train_versions
from streamserve.records import Source
from streamserve.wiring import build_worker

EVENTS = 4096


def main(argv: list[str]) -> int:
    sizes = [int(arg) for arg in argv] or [1, 16, 64, 256, 1024, 2048]
    logging.basicConfig(level=logging.WARNING)
    stack = find_stack()
    run_id = f"cost-{uuid.uuid4().hex[:8]}"
    entities = make_entities()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        payloads = encode_events(entities, EVENTS)
        dataset = Dataset(
            run_id=run_id,
            stack=stack,
            events_topic=f"bench-{run_id}-events",
            partitions=4,
            payloads=payloads,
            payload_file=directory / "unused",
            key_prefix=f"bench-{run_id}:",
            packed_prefix=f"bench-{run_id}-packed:",
            models={m.version: m.path for m in train_versions(entities, directory / "models")},
            entities=entities,
        )
        client = redis.Redis.from_url(stack.redis_url)
        load_entities(client, entities, dataset.key_prefix)
        client.close()
        output_topic = f"bench-{run_id}-out"
        overrides = {"control.enabled": False, "log_every_s": 0}
        path = streamserve_config(dataset, "cost", dataset.events_topic, output_topic, directory, overrides=overrides)
        settings = load_settings(path)
        ensure_topics({"bootstrap.servers": stack.bootstrap}, pipeline_topics(settings, dataset.partitions))
        worker = build_worker(settings)
        worker.delivery.start()
        fetch, redis_s = worker.processor.features.fetch, [0.0]
        assert fetch is not None

        def timed_fetch(requests: Any) -> Any:
            started = time.perf_counter()
            try:
                return fetch(requests)
            finally:
                redis_s[0] += time.perf_counter() - started

        worker.processor.features.fetch = timed_fetch
        now = int(time.time() * 1000)
        sources = [
            Source(settings.input.topic, i % dataset.partitions, i, key, value, None, now)
            for i, (key, value) in enumerate(payloads)
        ]
        print("batch size | CPU ms per batch | CPU us per event | wall ms per batch | Redis round trip ms per batch")
        for size in sizes:
            batches = [sources[start : start + size] for start in range(0, EVENTS - size + 1, size)] * max(
                1, 8 * size // EVENTS
            )
            for batch in batches[:3]:  # warm up
                worker.process(batch)
            worker.delivery.sink.flush(10)
            cpu, wall, redis_s[0] = time.process_time(), time.perf_counter(), 0.0
            for batch in batches:
                worker.process(batch)
                worker.delivery.commit()
            worker.delivery.sink.flush(10)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            n = len(batches)
            print(
                f"{size:10d} | {cpu / n * 1000:16.2f} | {cpu / n / size * 1e6:16.1f} | {wall / n * 1000:17.2f} | "
                f"{redis_s[0] / n * 1000:29.2f}"
            )
        worker.delivery.close()
        cleanup_redis(stack, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
