"""Fault injection against the real broker and Redis: nothing lost, and in exactly-once mode nothing doubled.

Each scenario streams a known set of events (unique ids) through three worker processes, breaks something
mid-stream, then counts every event's predictions on the output topic (read_committed in exactly-once
mode). A table of the results is printed at the end of the session.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient

from streamserve.control.publish import publish
from streamserve.control.rollout import AcceptancePolicy
from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import Pipeline, WorkerProcess, produce_in_background, wait_until
from tests.integration.servers import STACK, Servers

EVENTS = 20_000
RATE = 2_500  # events/s: the stream spans the fault
REPORT: list[FaultResult] = []


@dataclass
class FaultResult:
    scenario: str
    mode: str
    produced: int
    predicted: int
    missing: int
    duplicated: int
    recover_s: float


@dataclass
class Scenario:
    """Three workers, a stream of events, one fault in the middle of it."""

    pipeline: Pipeline
    log_dir: Path
    models: dict[str, TrainedModel]
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, index: int) -> WorkerProcess:
        worker = WorkerProcess(self.pipeline.path, self.log_dir, f"w{index}")
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        return worker

    def members(self) -> int:
        admin = AdminClient({"bootstrap.servers": self.pipeline.bootstrap})
        group = self.pipeline.settings.kafka.group_id
        try:
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        except KafkaException:  # e.g. NOT_COORDINATOR while a fresh broker loads __consumer_offsets
            return 0
        assigned = [m for m in description.members if m.assignment.topic_partitions]
        return len(assigned)


def _output_ids(pipeline: Pipeline, expected: set[str], isolation: str, timeout_s: float) -> Counter[str]:
    """Every prediction's event id: read until all expected ids are seen, then a few seconds more."""
    schema = load_schema(pipeline.settings.output.schema_path)
    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.bootstrap,
            "group.id": f"fault-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    consumer.subscribe([pipeline.settings.output.topic])
    counts: Counter[str] = Counter()
    deadline = time.monotonic() + timeout_s
    settle_until: float | None = None
    try:
        while settle_until is None or time.monotonic() < settle_until:
            if settle_until is None and expected <= counts.keys():
                settle_until = time.monotonic() + 3.0
            if time.monotonic() > deadline:
                break
            for msg in consumer.consume(2000, 0.3):
                if msg.error() is None:
                    counts[str(decode_prediction(schema, msg.value())["event_id"])] += 1
    finally:
        consumer.close()
    return counts


def _first_output_after(pipeline: Pipeline, after_ms: int) -> float:
    """Broker time of the first output record written after a moment (seconds after it)."""
    consumer = Consumer(
        {
            "bootstrap.servers": pipeline.bootstrap,
            "group.id": f"t-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([pipeline.settings.output.topic])
    first: int | None = None
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(5000, 0.5)
            if not batch:
                break
            stamps = [m.timestamp()[1] for m in batch if m.error() is None and m.timestamp()[1] >= after_ms]
            if stamps:
                first = min(stamps) if first is None else min(first, min(stamps))
    finally:
        consumer.close()
    return max(0.0, ((first or after_ms) - after_ms) / 1000)


def _bounce(server: str, down_for: float) -> None:
    subprocess.run(
        [sys.executable, str(STACK), "bounce", server, "--down-for", str(down_for)],
        check=True,
        capture_output=True,
        timeout=180,
    )


def kill_9(s: Scenario) -> None:
    s.workers[0].kill()
    time.sleep(1.0)
    s.start_worker(0)


def rolling_restart(s: Scenario) -> None:
    for index in range(len(s.workers)):
        assert s.workers[index].stop() == 0, s.workers[index].log_tail()
        s.start_worker(index).wait_logged("assigned", timeout_s=60)


def broker_restart(s: Scenario) -> None:
    _bounce("kafka", 10)


def redis_outage(s: Scenario) -> None:
    _bounce("redis", 5)


def hot_swap_during_rebalance(s: Scenario) -> None:
    s.start_worker(len(s.workers))  # a fourth member joins: the group rebalances...
    publish(
        {"bootstrap.servers": s.pipeline.bootstrap},
        s.pipeline.settings.control.topic,
        AcceptancePolicy("fraud"),
        "v2",
        str(s.models["v2"].path),
    )  # ...during a swap


SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "kill -9 one of three workers, restart it": kill_9,
    "rolling restart (SIGTERM one at a time)": rolling_restart,
    "broker stopped 10 s and restarted": broker_restart,
    "Redis stopped 5 s": redis_outage,
    "hot swap during a rebalance": hot_swap_during_rebalance,
}
NEEDS_NATIVE_STACK = {broker_restart, redis_outage}


@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(
    name: str,
    mode: str,
    stack: Servers,
    tmp_path: Path,
    entities: Entities,
    models: dict[str, TrainedModel],
    pipeline_factory: Callable[..., Pipeline],
) -> None:
    fault = SCENARIOS[name]
    if fault in NEEDS_NATIVE_STACK and stack.origin != "native stack (scripts/stack)":
        pytest.skip(f"stopping and restarting a server needs the project's own stack, not {stack.origin}")
    pipeline = pipeline_factory(
        partitions=6, delivery=mode, redis={"on_error": "wait", "backoff_ms": 100, "max_backoff_ms": 500}
    )
    s = Scenario(pipeline, tmp_path, models)
    for index in range(3):
        s.start_worker(index)
    wait_until(lambda: s.members() == 3, 90, "three workers sharing the partitions")

    events = list(make_events(entities, EVENTS, seed=hash(name) % 1000 + (7 if mode == "exactly_once" else 0)))
    ids = {e["event_id"] for e in events}
    producer = produce_in_background(pipeline, events, RATE)
    time.sleep(EVENTS / RATE / 4)  # a quarter of the stream is in flight
    fault(s)
    fault_end_ms = int(time.time() * 1000)
    producer.join(240)
    assert not producer.is_alive(), "the load generator did not finish"
    assert producer.error is None, f"the load generator failed (not the workers): {producer.error}"
    isolation = "read_committed" if mode == "exactly_once" else "read_uncommitted"
    counts = _output_ids(pipeline, ids, isolation, timeout_s=180)
    for worker in s.workers:
        if worker.process.poll() is None:
            assert worker.stop() == 0, worker.log_tail()
    recover_s = _first_output_after(pipeline, fault_end_ms)

    missing = len(ids - counts.keys())
    duplicated = sum(n - 1 for event_id, n in counts.items() if event_id in ids and n > 1)
    REPORT.append(FaultResult(name, mode, len(ids), len(counts.keys() & ids), missing, duplicated, recover_s))
    assert missing == 0, f"{missing} events without a prediction"
    if mode == "exactly_once":
        assert duplicated == 0, f"{duplicated} duplicate predictions under exactly-once"


def report_table() -> str:
    """The results so far as a Markdown table."""
    lines = [
        "| scenario | mode | produced | predicted | missing | duplicated | time to recover (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in REPORT:
        lines.append(
            f"| {r.scenario} | {r.mode} | {r.produced} | {r.predicted} | {r.missing} | {r.duplicated} "
            f"| {r.recover_s:.1f} |"
        )
    return "\n".join(lines)
