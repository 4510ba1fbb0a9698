"""Zombie fencing in exactly-once mode, and bounded memory when the feature store slows down."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from streamserve.demo.data import Entities, make_events
from tests.faults.test_faults import _output_ids
from tests.integration.harness import (
    Pipeline,
    WorkerProcess,
    WorkerThread,
    produce_events,
    produce_in_background,
    wait_until,
)


def test_zombie_is_fenced_and_stops_cleanly_without_duplicates(
    pipeline_factory: Callable[..., Pipeline], entities: Entities, tmp_path: Path
) -> None:
    pipeline = pipeline_factory(delivery="exactly_once")
    events = list(make_events(entities, 10_000, seed=123))
    zombie = WorkerProcess(pipeline.path, tmp_path, "same-id")
    zombie.wait_logged("assigned")
    # Slow enough that input still flows when the successor is up, even on a loaded machine: an idle zombie
    # opens no transaction, so it learns it was fenced only from its next batch.
    producer = produce_in_background(pipeline, events, rate=500)
    time.sleep(1.5)
    # A second instance with the same worker id (hence transactional.id) fences the first one.
    successor = WorkerProcess(pipeline.path, tmp_path, "same-id")
    wait_until(lambda: zombie.process.poll() is not None, 60, "the fenced worker to stop")
    assert zombie.process.returncode == 0, zombie.log_tail()
    assert "fenced, stopping without committing" in zombie.log_tail(400)
    producer.join(60)
    counts = _output_ids(pipeline, {e["event_id"] for e in events}, "read_committed", timeout_s=120)
    assert successor.stop() == 0, successor.log_tail()
    assert {e["event_id"] for e in events} <= counts.keys()
    assert max(counts.values()) == 1, "exactly-once: no prediction twice"


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match, status
    return int(match.group(1)) / 1024


def test_slow_feature_store_pauses_intake_with_bounded_memory(
    pipeline_factory: Callable[..., Pipeline], entities: Entities, tmp_path: Path, redis_client: redis.Redis
) -> None:
    pipeline = pipeline_factory(**{"batch.max_inflight_batches": 2})
    backlog = list(make_events(entities, 60_000, seed=124))
    produce_events(pipeline, backlog)  # a backlog far larger than what the worker may hold
    worker = WorkerProcess(pipeline.path, tmp_path, "slow-redis")
    stop = threading.Event()

    def slow_redis() -> None:  # Redis answers nothing for 150 ms out of every 200 ms
        while not stop.is_set():
            redis_client.execute_command("CLIENT", "PAUSE", 150, "ALL")
            time.sleep(0.2)

    slower = threading.Thread(target=slow_redis, daemon=True)
    slower.start()
    try:
        counts = _output_ids(pipeline, {e["event_id"] for e in backlog}, "read_uncommitted", timeout_s=240)
        peak = _peak_rss_mib(worker.process.pid)
    finally:
        stop.set()
        slower.join()
        assert worker.stop() == 0, worker.log_tail()
    assert {e["event_id"] for e in backlog} <= counts.keys()
    print(f"\npeak RSS of a worker draining a 60k-event backlog through a throttled Redis: {peak:.0f} MiB")


def test_slow_sink_pauses_partitions_and_loses_nothing(
    pipeline_factory: Callable[..., Pipeline], entities: Entities
) -> None:
    # linger.ms of 1.5 s makes every acknowledgement slow: the in-flight limit holds intake back.
    pipeline = pipeline_factory(**{"batch.max_inflight_batches": 4, "kafka.producer": {"linger.ms": 1500}})
    events = list(make_events(entities, 8_000, seed=125))
    produce_events(pipeline, events)
    worker = WorkerThread(pipeline.settings)
    try:
        counts = _output_ids(pipeline, {e["event_id"] for e in events}, "read_uncommitted", timeout_s=120)
    finally:
        worker.stop()
    assert {e["event_id"] for e in events} <= counts.keys()
    assert worker.worker.stats.paused > 0, "the in-flight limit was never reached: the test proves nothing"
