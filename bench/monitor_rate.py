"""The monitor phase (issue 24): how many records/s `streamserve monitor` joins, with 1 and 2 processes in its group.

The workload is what one worker's output and its labels make: for each scored event one prediction on the output
topic (live version v1; schemas/prediction.avsc, as the worker writes it) and one label on the labels topic (label
time 1 to 90 minutes after the event, in event time), pre-produced as a backlog of --events events (8 partitions,
event times 5 ms apart: 20 minutes of events at 200/s of event time). Then `streamserve monitor` starts with 1, then
2 processes in one faust group (a fresh group and internal topics each run, `monitor.partitions: 8`: the processes
split the join) and works through the backlog. The rate is the backlog's records (predictions + labels) over the
time from the first committed input offset to the moment every input record is forwarded and every by-event
bundle of every partition joined (the group's committed offsets, read every 0.25 s; faust commits every second).
The join state, the changelog writes and the quality reports (every 10 s, over the open windows, by the process
owning partition 0) are all in it. Then the reporter's ceiling (``reporter_rate``): a fresh reporter reads the last
run's changelog and decodes it, as the reporting process does, whatever the number of joining processes.

In `make bench` it runs after the batch phase (bench.run; `--only monitor` runs it alone among the phases);
alone: `python -m bench.monitor_rate [--events N] [--processes 1,2]`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.dataset import SCHEMAS, Stack, delete_topics, find_stack
from bench.procs import Job, watermarks
from bench.scenarios import EXAMPLE_PIPELINE
from streamserve.config import apply_overrides, config_from
from streamserve.monitor import labels
from streamserve.ops.admin import TopicSpec, ensure_topics

RECORDS_PER_EVENT = 2
"""A prediction and its label."""
PARTITIONS = 8
"""``monitor.partitions``: the join's partitions, split between the processes of a run."""
EVENT_STEP_MS = 5
T0 = 1_767_225_600_000


def workload(count: int, seed: int = 24) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """(key, value) of the predictions and of the labels of ``count`` events."""
    schema = fastavro.parse_schema(json.loads((SCHEMAS / "prediction.avsc").read_text()))
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, count)
    scores = np.round(1 / (1 + np.exp(-(1.5 * (truth - 0.5) + rng.normal(0, 1, count)))), 3)
    lags = rng.integers(60_000, 90 * 60_000, count)
    predictions, labelled = [], []
    buffer = io.BytesIO()
    for i in range(count):
        event_id, key, time_ms, score = f"m-{i:09d}", f"card-{i % 2000}", T0 + i * EVENT_STEP_MS, float(scores[i])
        record = {
            "event_id": event_id,
            "key": key,
            "model_name": "fraud",
            "model_version": "v1",
            "score": score,
            "label": None,
            "event_time": time_ms,
            "prediction_time": time_ms + 5,
            "source_topic": "transactions",
            "source_partition": 0,
            "source_offset": i,
            "degraded": False,
            "predicted_class": str(int(score >= 0.5)),
            "probabilities": {"0": 1 - score, "1": score},
            "outputs": None,
        }
        buffer.seek(0)
        buffer.truncate()
        fastavro.schemaless_writer(buffer, schema, record)
        predictions.append((key.encode(), buffer.getvalue()))
        labelled.append((event_id.encode(), labels.encode(event_id, str(truth[i]), time_ms + int(lags[i]))))
    return predictions, labelled


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """The records, lz4-compressed as the workers' producers write (the monitor pays the decompression)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "compression.type": "lz4"})
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"pre-producing {topic} did not finish")


def monitor_config(stack: Stack, name: str, app_id: str, directory: Path) -> Path:
    """The fraud example's pipeline pointed at this run's topics, its monitor in a group of its own."""
    config = config_from(EXAMPLE_PIPELINE, {})
    apply_overrides(
        config,
        {
            "input.topic": f"{name}-in",
            "output.topic": f"{name}-out",
            "output.dead_letter_topic": f"{name}-out.dlq",
            "kafka": {"bootstrap_servers": stack.bootstrap, "group_id": f"{name}-group"},
            "redis.url": stack.redis_url,
            "monitor": {
                "labels_topic": f"{name}-labels",
                "quality_topic": f"{name}-quality",
                "app_id": app_id,
                "partitions": PARTITIONS,
                "port": None,
            },
        },
    )
    path = directory / f"{app_id}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Progress:
    """The monitor group's committed offsets against the topics' ends."""

    def __init__(self, bootstrap: str, group: str, inputs: list[str], by_event: str, partitions: int) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        self.inputs = [TopicPartition(t, p) for t in inputs for p in range(partitions)]
        self.by_event = [TopicPartition(by_event, p) for p in range(PARTITIONS)]

    def _committed(self, tps: list[TopicPartition]) -> int:
        return sum(max(tp.offset, 0) for tp in self.consumer.committed(tps, timeout=10))

    def forwarded(self) -> int:
        return self._committed(self.inputs)

    def joined(self) -> bool:
        """Every bundle on every partition of the by-event topic is committed by the joins."""
        try:
            highs = [watermarks(self.consumer, tp, timeout_s=2.0)[1] for tp in self.by_event]
        except Exception:  # noqa: BLE001 - the topic is created by the monitor a moment after it starts
            return False
        return sum(highs) > 0 and self._committed(self.by_event) >= sum(highs)

    def close(self) -> None:
        self.consumer.close()


def run_once(
    stack: Stack, name: str, processes: int, records: int, directory: Path, timeout_s: float, profile: bool = False
) -> dict[str, Any]:
    """One run of the monitor with ``processes`` processes over the backlog of topics ``name-*``."""
    group = f"{name}-p{processes}"
    config = monitor_config(stack, name, group, directory)
    argv = [sys.executable, "-m", "streamserve", "--log-format", "text", "monitor", "-c", str(config)]
    job = Job(f"monitor-{processes}p", [argv] * processes, directory / "logs").start()
    spy = _py_spy(job.pids[0], directory / f"monitor-{processes}p.pyspy.txt") if profile else None
    progress = Progress(stack.bootstrap, group, [f"{name}-out", f"{name}-labels"], f"{group}-by-event", 8)
    started = done = None
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            job.check_alive()
            forwarded = progress.forwarded()
            now = time.monotonic()
            if started is None and forwarded > 0:
                started = now
            if forwarded >= records and progress.joined():
                done = now
                break
            time.sleep(0.25)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled
            spy.wait(60)
        cpu = _cpu_seconds(job)
        job.stop()
        progress.close()
    if started is None or done is None:
        return {"processes": processes, "records_per_s": None, "finished": False, "timeout_s": timeout_s}
    seconds = max(done - started, 1e-6)
    return {
        "processes": processes,
        "records": records,
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds, 1),
        "cpu_s_per_1k": round(cpu / records * 1000, 4) if cpu else None,
        "finished": True,
    }


def reporter_rate(stack: Stack, changelog: str, events: int, timeout_s: float = 300) -> dict[str, Any]:
    """How fast the reporter takes in a run's join state (every partition of its changelog, as ``streamserve
    monitor``'s reporter does), then how long the report of the window takes: the reporter is one thread of one
    process, whatever the number of joining processes, so this is the group's ceiling. The read is timed from its
    first record to the changelog's end, the decoding of the entries (once per entry and report: ``View.due``)
    after it; the rate is the events over the two."""
    from streamserve.config import MonitorSettings
    from streamserve.monitor.pairs import Timing
    from streamserve.monitor.report import ReportSettings, window_reports
    from streamserve.monitor.reporter import ChangelogReader, View, collect_less

    collect_less()  # as in a monitor process
    defaults = MonitorSettings()  # the monitor's, as in the runs
    window_ms = int(defaults.window_s * 1000)
    view = View(Timing(window_ms, int(defaults.label_ttl_s * 1000), int(defaults.sweep_s * 1000)), PARTITIONS)
    reader = ChangelogReader(view, changelog, {"bootstrap.servers": stack.bootstrap})
    deadline = time.monotonic() + timeout_s
    first = None
    reader.start()
    try:
        while time.monotonic() < deadline:
            with view.lock:
                if first is None and view.records:
                    first = time.perf_counter()
                if view.caught_up:
                    break
            time.sleep(0.005)
        read_s = time.perf_counter() - (first or time.perf_counter())
    finally:
        reader.stop()
    if not view.caught_up:
        return {"finished": False, "timeout_s": timeout_s}
    began = time.perf_counter()
    due = view.due()
    decode_s = time.perf_counter() - began
    began = time.perf_counter()
    for item in due:
        window_reports(item.window, window_ms, item.entries, ReportSettings("classification", "1"), False, 0)
    report_s = time.perf_counter() - began
    seconds = max(read_s + decode_s, 1e-6)
    return {
        "finished": True,
        "records": view.records,
        "records_per_event": round(view.records / events, 2),
        "read_s": round(read_s, 3),
        "decode_s": round(decode_s, 3),
        "records_per_s": round(view.records / seconds, 1),
        "events_per_s": round(events / seconds, 1),
        "report_s": round(report_s, 2),
        "report_entries": sum(len(item.entries) for item in due),
    }


def _py_spy(pid: int, raw: Path) -> subprocess.Popen[bytes]:
    """py-spy (the bench extra) sampling the process until SIGINT; its raw stacks to ``raw``."""
    py_spy = str(Path(sys.executable).parent / "py-spy")
    command = [py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--output", str(raw)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_seconds(job: Job) -> float | None:
    import psutil

    total = 0.0
    for pid in job.pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        total += times.user + times.system
    return total


def monitor_rate(
    stack: Stack,
    directory: Path,
    run_id: str,
    events: int = 100_000,
    processes: tuple[int, ...] = (1, 2),
    timeout_s: float = 300,
    profile: bool = False,
) -> dict[str, Any]:
    """The phase: the backlog once, then one run per process count; records/s of each. Its topics are the
    run's (``bench-<run_id>-monitor-*``: bench.dataset.delete_topics removes them)."""
    name = f"bench-{run_id}-monitor"
    directory.mkdir(parents=True, exist_ok=True)
    predictions, labelled = workload(events)
    topics = [f"{name}-{t}" for t in ("in", "out", "out.shadow", "labels", "labels.dlq", "out.dlq")]
    ensure_topics({"bootstrap.servers": stack.bootstrap}, [TopicSpec(t, 8, {}) for t in topics])
    ensure_topics({"bootstrap.servers": stack.bootstrap}, [TopicSpec(f"{name}-quality", 1, {})])
    _produce(stack.bootstrap, f"{name}-out", predictions)
    _produce(stack.bootstrap, f"{name}-labels", labelled)
    records = len(predictions) + len(labelled)
    runs = [run_once(stack, name, n, records, directory, timeout_s, profile) for n in processes]
    reporter = reporter_rate(stack, f"{name}-p{processes[-1]}-pairs-changelog", events)
    return {
        "events": events,
        "records": records,
        "records_per_event": RECORDS_PER_EVENT,
        "partitions": PARTITIONS,
        "runs": runs,
        "reporter": reporter,
        "topic": name,
    }


def processes_needed(result: dict[str, Any], worker_events_per_s: float | None) -> int | None:
    """Joining processes one worker's events/s takes at the rate per process of the run with the most processes
    (the join scales with them up to ``monitor.partitions``); None when the reporter's ceiling is below that rate:
    no number of processes follows it then."""
    runs = [r for r in result.get("runs", []) if r.get("records_per_s")]
    reporter = result.get("reporter") or {}
    if not runs or not worker_events_per_s:
        return None
    widest = max(runs, key=lambda r: r["processes"])
    if not reporter.get("events_per_s") or reporter["events_per_s"] < worker_events_per_s:
        return None
    per_process = widest["records_per_s"] / widest["processes"]
    return math.ceil(worker_events_per_s * result["records_per_event"] / per_process)


def main(argv: list[str] | None = None) -> int:
    """Run the phase alone against the local stack."""
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_rate", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000, help="scored events in the backlog (100000)")
    parser.add_argument("--processes", default="1,2", help="monitor processes of each run (1,2)")
    parser.add_argument("--worker-rate", type=float, help="a worker's events/s, for the processes it needs")
    parser.add_argument("--out", type=Path, help="directory of the configs and monitor logs (a temporary one)")
    parser.add_argument("--profile", action="store_true", help="py-spy the first monitor process of each run")
    args = parser.parse_args(argv)
    stack = find_stack()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.out or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        run_id = "monitor-" + uuid.uuid4().hex[:6]
        try:
            counts = tuple(int(p) for p in args.processes.split(","))
            result = monitor_rate(stack, directory, run_id, args.events, counts, profile=args.profile)
        finally:
            delete_topics(stack, run_id)
    result["processes_needed"] = processes_needed(result, args.worker_rate)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
