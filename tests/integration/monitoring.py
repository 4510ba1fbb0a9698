"""Helpers of the monitor's integration tests: a pipeline config, streams of predictions and labels with known
truth, the monitor as a process, and the reports it wrote."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import fastavro
import numpy as np
from confluent_kafka import Producer

from streamserve.config import PipelineSettings
from streamserve.control.reading import read_keyed_records
from streamserve.monitor import labels
from streamserve.monitor.report import decode
from streamserve.pipeline.decode import load_schema
from tests.integration.harness import Pipeline, unique, wait_until

HOUR_MS = 3_600_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a window boundary


def monitor_pipeline(bootstrap: str, redis_url: str, directory: Path, **monitor: Any) -> Pipeline:
    """A pipeline whose monitor reports 1-hour windows every second, with its own topics."""
    name = unique("mon")
    settings = {
        "quality_topic": f"{name}-quality",
        "window_s": 3600,
        "label_ttl_s": 7200,
        "sweep_s": 60,
        "idle_s": 3,
        "port": 0,  # a free port (the log names it)
        "report_every_s": 1,
        "min_labels": 50,
        "bootstrap_samples": 200,
        "partitions": 4,
        **monitor,
    }
    pipe = Pipeline(
        bootstrap, redis_url, directory, directory / "unused.onnx", name=name, overrides={"monitor": settings}
    )
    pipe.create_topics()
    return pipe


@dataclass
class Event:
    event_id: str
    time_ms: int
    key: str
    truth: Any
    predictions: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    """(model, version, topic role main|shadow) -> prediction fields."""
    label_time_ms: int | None = None


class Stream:
    """Predictions and labels produced to a pipeline's topics (schemaless Avro, as the worker writes them)."""

    def __init__(self, settings: PipelineSettings, bootstrap: str) -> None:
        self.settings = settings
        self.schema = load_schema(settings.output.schema_path)
        # lz4 like the workers' producers: the monitor must read what they write
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": "lz4"})

    def prediction(self, event: Event, model: str, version: str, role: str) -> None:
        fields = event.predictions[(model, version, role)]
        record = {
            "event_id": event.event_id,
            "key": event.key,
            "model_name": model,
            "model_version": version,
            "score": fields["score"],
            "label": None,
            "event_time": event.time_ms,
            "prediction_time": event.time_ms + 5,
            "source_topic": self.settings.input.topic,
            "source_partition": 0,
            "source_offset": 0,
            "degraded": False,
            "predicted_class": fields.get("predicted_class"),
            "probabilities": fields.get("probabilities"),
            "outputs": None,
        }
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self.schema, record)
        topic = self.settings.shadow_topic if role == "shadow" else self.settings.output.topic
        self.producer.produce(topic, buffer.getvalue(), key=event.key.encode())

    def label(self, event_id: str, value: Any, time_ms: int) -> None:
        self.producer.produce(
            self.settings.labels_topic, labels.encode(event_id, value, time_ms), key=event_id.encode()
        )

    def raw_label(self, data: bytes, key: bytes | None = None) -> None:
        self.producer.produce(self.settings.labels_topic, data, key=key)

    def ticks(self, time_ms: int, model: str = "tick", count: int = 256, label: Any = "0") -> None:
        """Labelled predictions of `model` at `time_ms`: they advance both clocks of every partition."""
        for _ in range(count):
            event = Event(unique("tick"), time_ms, unique("key"), "0")
            event.predictions[(model, "t", "main")] = {"score": 0.1, "predicted_class": "0", "probabilities": None}
            self.prediction(event, model, "t", "main")
            self.label(event.event_id, label, time_ms)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def binary_events(
    count: int, seed: int, start_ms: int, strengths: dict[tuple[str, str, str], float], prefix: str = "ev"
) -> list[Event]:
    """Events of a binary task, each scored by the given (model, version, role)s; a higher strength separates
    the classes better. Scores are rounded to 3 decimals (ties)."""
    rng = np.random.default_rng(seed)
    events = []
    for i in range(count):
        truth = int(rng.integers(0, 2))
        event = Event(
            f"{prefix}-{seed}-{i}", start_ms + i * (HOUR_MS // count), f"card-{rng.integers(0, 500)}", str(truth)
        )
        for ident, strength in strengths.items():
            p = float(np.round(1 / (1 + np.exp(-(strength * (truth - 0.5) + rng.normal(0, 1)))), 3))
            event.predictions[ident] = {
                "score": p,
                "predicted_class": str(int(p >= 0.5)),
                "probabilities": {"0": 1 - p, "1": p},
            }
        events.append(event)
    return events


class MonitorProcess:
    """`streamserve monitor` as a user starts it, in its own process."""

    running: ClassVar[list[MonitorProcess]] = []

    def __init__(self, config: Path, log_dir: Path) -> None:
        self.log_path = log_dir / f"monitor-{len(MonitorProcess.running)}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamserve", "--log-format", "text", "monitor", "-c", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
        MonitorProcess.running.append(self)

    def metrics(self) -> str:
        """The monitor's /metrics, on the port its log names."""
        import re
        import urllib.request

        found = re.search(r"metrics and health on port (\d+)", self.log_path.read_text(errors="replace"))
        assert found, self.log_tail()
        with urllib.request.urlopen(f"http://127.0.0.1:{found.group(1)}/metrics", timeout=5) as reply:
            return str(reply.read().decode())

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"monitor exited with {self.process.returncode}:\n{self.log_tail()}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    @classmethod
    def stop_all(cls) -> None:
        for monitor in cls.running:
            if monitor.process.poll() is None:
                monitor.process.kill()
                monitor.process.wait(10)
        cls.running.clear()


def reports(bootstrap: str, topic: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest report of each (model, window) on the quality topic."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for _, value in read_keyed_records({"bootstrap.servers": bootstrap}, topic, timeout_s=30):
        if value:
            report = decode(value)
            found[(report["model_name"], report["window_start"])] = report
    return found


def wait_for_report(
    bootstrap: str,
    topic: str,
    model: str,
    window: int,
    monitor: MonitorProcess,
    ready: Any,
    timeout_s: float = 120,
) -> dict[str, Any]:
    """Wait until the (model, window) report satisfies `ready(report)`; return it."""
    found: dict[str, Any] = {}

    def check() -> bool:
        monitor.assert_alive()
        report = reports(bootstrap, topic).get((model, window))
        if report is not None and ready(report):
            found.update(report)
            return True
        return False

    try:
        wait_until(check, timeout_s, f"a report of {model} for window {window}", interval_s=1.0)
    except AssertionError as exc:
        last = reports(bootstrap, topic).get((model, window))
        shown = [(v["version"], v["role"], v["labelled"], v["pending"]) for v in last["versions"]] if last else None
        raise AssertionError(f"{exc}; last report: {shown}; monitor log:\n{monitor.log_tail(30)}") from None
    return found


def version_row(report: dict[str, Any], version: str, role: str) -> dict[str, Any]:
    rows = [v for v in report["versions"] if v["version"] == version and v["role"] == role]
    assert rows, f"no {version} ({role}) in {[(v['version'], v['role']) for v in report['versions']]}"
    return rows[0]


def produce_in_time_order(stream: Stream, items: Iterable[tuple[int, int, Any]]) -> None:
    """Produce (time, tiebreak, callable) items in event-time order."""
    for _, _, send in sorted(items, key=lambda item: (item[0], item[1])):
        send()
    stream.flush()
