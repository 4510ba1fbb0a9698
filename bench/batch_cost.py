"""CPU per micro-batch of one worker by batch size: the fixed cost per batch and the cost per event.

Run with `python -m bench.batch_cost [--stages] [sizes...]` against the local stack (`python3 scripts/stack up`). A
worker is built as the bench builds it (examples/fraud/pipeline.yaml, hash features in Redis, the demo's model) and
its batch path (decode, features with the Redis round trip, inference, encoding, produce, acknowledgement,
commit) runs on pre-made records of each size; no consumer, so no poll cost. CPU is the whole process's
(librdkafka's threads included). The per-batch fixed cost is what the default max_batch_size weighs against;
the Redis round trip (wall time of the one pipelined fetch per batch) is what overlapping it could win.
`--stages` adds, per size, the main thread's CPU per event in each stage (thread time around the stage's call).
"""

from __future__ import annotations

import argparse
import collections
import gc
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
from streamserve.config import load_settings
from streamserve.demo.data import make_entities
from streamserve.demo.train import train_versions
from streamserve.ops.admin import ensure_topics, pipeline_topics
from streamserve.records import Source
from streamserve.wiring import build_worker

EVENTS = 4096
BATCHES = 40
"""Batches measured per size, at least (the 4,096 events are replayed as often as it takes)."""
STAGES = [
    ("decode", "processor", "decode_batch"),
    ("features", "processor", "_features"),
    ("  of which the Redis fetch", "features", "fetch"),
    ("inference", "processor", "predict"),
    ("encoding", "encoder", "encode"),
    ("produce", "sink", "produce_all"),
]


def _timed_stages(worker: Any) -> collections.Counter[str]:
    """Wrap each stage's call so that its main-thread CPU adds up per stage (outermost calls only)."""
    spent: collections.Counter[str] = collections.Counter()
    owners = {
        "processor": worker.processor,
        "features": worker.processor.features,
        "encoder": worker.processor.encoder,
        "sink": worker.delivery.sink,
    }
    for stage, owner, name in STAGES:
        target = owners[owner]
        call = getattr(target, name)

        def timed(*args: Any, _call: Any = call, _stage: str = stage, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return _call(*args, **kwargs)
            finally:
                spent[_stage] += time.thread_time() - started

        setattr(target, name, timed)
    return spent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", action="store_true", help="main-thread CPU per event in each stage")
    parser.add_argument("sizes", nargs="*", type=int, help="batch sizes (default: 1 16 64 256 1024 2048)")
    args = parser.parse_args(argv)
    sizes = args.sizes or [1, 16, 64, 256, 1024, 2048]
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
        spent = _timed_stages(worker) if args.stages else None
        gc.collect()
        gc.freeze()  # as the worker does after start-up
        now = int(time.time() * 1000)
        sources = [
            Source(settings.input.topic, i % dataset.partitions, i, key, value, None, now)
            for i, (key, value) in enumerate(payloads)
        ]
        print("batch size | CPU ms per batch | CPU us per event | wall ms per batch | Redis round trip ms per batch")
        for size in sizes:
            batches = [sources[start : start + size] for start in range(0, EVENTS - size + 1, size)]
            batches *= -(-BATCHES // len(batches))
            for batch in batches[:3]:  # warm up
                worker.process(batch)
            worker.delivery.sink.flush(10)
            cpu, wall, redis_s[0] = time.process_time(), time.perf_counter(), 0.0
            main_thread = time.thread_time()
            if spent is not None:
                spent.clear()
            for batch in batches:
                worker.process(batch)
                worker.delivery.commit()
            worker.delivery.sink.flush(10)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            main_thread = time.thread_time() - main_thread
            n = len(batches)
            print(
                f"{size:10d} | {cpu / n * 1000:16.2f} | {cpu / n / size * 1e6:16.1f} | {wall / n * 1000:17.2f} | "
                f"{redis_s[0] / n * 1000:29.2f}"
            )
            if spent is not None:
                events = n * size
                print(f"{'':10} | main thread {main_thread / events * 1e6:.1f} us per event:")
                for stage, _, _ in STAGES:
                    print(f"{'':10} |   {stage:<26} {spent[stage] / events * 1e6:6.2f} us per event")
                rest = main_thread - sum(spent[stage] for stage, _, _ in STAGES if not stage.startswith(" "))
                print(f"{'':10} |   {'the rest (delivery, acks)':<26} {rest / events * 1e6:6.2f} us per event")
        worker.delivery.close()
        cleanup_redis(stack, run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
