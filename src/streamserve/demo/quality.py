"""The demo's last step: labels for the scored events, `streamserve monitor` joining them, the v1 vs v2 table.

The monitor runs beside the worker from the start (its own process: faust runs its own event loop), so it has
joined its group and read the predictions by the time the labels come. The labels are what a fraud team learns
later: the truth of most transactions, one to five hours after them in event time (so most arrive after their
hour's window closed: "late"); some never come (they stay pending until the label TTL, a day of event time,
passes). The truth is drawn like the training data's (demo/data.py ``fraud_label`` on the event's features, its
streamed transaction count included). The table is the one `streamserve models quality` prints.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from streamserve.config import PipelineSettings
from streamserve.control.reading import read_keyed_records
from streamserve.demo.data import Entities, feature_row, fraud_label, streamed_counts
from streamserve.monitor import labels
from streamserve.monitor.report import decode, format_report

LABELLED_SHARE = 0.9
"""Share of the scored events whose label comes; the others never do."""
LAG_MS = (3_600_000, 5 * 3_600_000)
"""A label's time after its event's, in event time."""


def fresh_quality_topic(base: PipelineSettings, run_id: str) -> None:
    """This run's quality topic (env override, like the demo's other topics), the monitor reporting every second
    on a free port (the example's 9465 may be taken)."""
    os.environ["STREAMSERVE_MONITOR__QUALITY_TOPIC"] = f"{base.monitor.quality_topic}-{run_id}"
    os.environ["STREAMSERVE_MONITOR__REPORT_EVERY_S"] = "1"
    os.environ["STREAMSERVE_MONITOR__PORT"] = "0"


class QualityMonitor:
    """`streamserve monitor` in its own process, stopped by its PID."""

    def __init__(self, config: Path, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        with log_path.open("ab") as log_file:
            command = [sys.executable, "-m", "streamserve", "--log-level", "WARNING", "monitor", "-c", str(config)]
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not stopped within 30 s (nothing when it has exited)."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def produce_labels(
    settings: PipelineSettings,
    events: list[dict[str, Any]],
    entities: Entities,
    versions: Mapping[str, str],
    seed: int = 24,
) -> Counter[str]:
    """Labels for LABELLED_SHARE of the scored events, LAG_MS after them; labelled events per version."""
    rng = np.random.default_rng(seed)
    counts = streamed_counts(events)
    rows = np.array([feature_row(e, entities, c) for e, c in zip(events, counts, strict=True)])
    truth = fraud_label(rows, rng)
    producer = Producer(settings.kafka.producer_config())
    labelled: Counter[str] = Counter()
    for event, is_fraud in zip(events, truth, strict=True):
        event_id = str(event["event_id"])
        if event_id not in versions or rng.random() >= LABELLED_SHARE:
            continue
        at = int(event["event_time"]) + int(rng.integers(*LAG_MS))
        producer.produce(settings.labels_topic, labels.encode(event_id, int(is_fraud), at), event_id.encode())
        producer.poll(0)
        labelled[versions[event_id]] += 1
    producer.flush(30)
    return labelled


def wait_for_table(
    settings: PipelineSettings, monitor: QualityMonitor, labelled: Mapping[str, int], timeout_s: float
) -> list[str]:
    """The quality tables (one per window: the demo's events may straddle an hour) once the monitor's reports have
    joined every label produced; [] after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    config = settings.kafka.common()
    while time.monotonic() < deadline and monitor.process.poll() is None:
        windows: dict[int, dict[str, Any]] = {}
        for key, value in read_keyed_records(config, settings.monitor.quality_topic, timeout_s=10):
            if value and key and key.decode(errors="replace").startswith(f"{settings.model.name}|"):
                report = decode(value)
                windows[report["window_start"]] = report  # the latest record of a key is the report
        joined: Counter[str] = Counter()
        for report in windows.values():
            for row in report["versions"]:
                joined[row["version"]] += row["labelled"]
        if windows and joined == Counter(labelled):
            return [line for start in sorted(windows) for line in format_report(windows[start])]
        time.sleep(1.0)
    return []


def summary_lines(labelled: Mapping[str, int], events: int, table: list[str], monitor: QualityMonitor) -> list[str]:
    """The demo summary's quality part: what was labelled, then the table."""
    count = sum(labelled.values())
    lines = [
        f"      quality:          {count} labels 1-5 h late in event time, {events - count} never; "
        "`streamserve monitor` joined them (`streamserve models quality` prints this table):"
    ]
    shown = table or [f"no report joined every label in time (see {monitor.log_path})"]
    return lines + [f"        {line}" for line in shown]
