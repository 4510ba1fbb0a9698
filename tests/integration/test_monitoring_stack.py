"""`scripts/stack up --monitoring-only`: Prometheus and Alertmanager that find the workers `run` starts.

Its own state dir (never the shared stack's); Kafka and Redis are the shared stack's. A worker and the lag
exporter started with `stack env`'s STREAMSERVE_OBSERVE__TARGETS_DIR name themselves there, Prometheus scrapes
them with the project's rules loaded and points at the Alertmanager; a clean stop removes the target.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Pipeline, WorkerProcess, wait_until

REPO = Path(__file__).resolve().parents[2]
STACK = [sys.executable, str(REPO / "scripts" / "stack")]


def _stack(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [*STACK, "--state-dir", str(state_dir), *args, "--monitoring-only"]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture
def monitoring_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    state_dir = tmp_path / "monitoring"
    started = _stack(state_dir, "up")
    if started.returncode != 0:
        pytest.fail(f"scripts/stack up --monitoring-only failed:\n{started.stderr}", pytrace=False)
    env = dict(line.split("=", 1) for line in _stack(state_dir, "env").stdout.splitlines() if "=" in line)
    yield env
    stopped = _stack(state_dir, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert _stack(state_dir, "status").returncode == 3, "down left Prometheus or Alertmanager running"


def _api(url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as response:
        return json.load(response)["data"]


def _up_targets(url: str) -> dict[str, str]:
    """job of every active target Prometheus scrapes successfully, by scrape address."""
    targets = _api(url, "/api/v1/targets")["activeTargets"]
    return {t["labels"]["instance"]: t["labels"]["job"] for t in targets if t["health"] == "up"}


def _written(worker: WorkerProcess, path: Path) -> bool:
    worker.assert_alive()
    return path.exists()


def test_prometheus_finds_the_workers_and_the_lag_exporter_that_run_starts(
    monitoring_env: dict[str, str],
    pipeline_factory: Callable[..., Pipeline],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prometheus, targets_dir = monitoring_env["PROMETHEUS_URL"], Path(monitoring_env["STREAMSERVE_OBSERVE__TARGETS_DIR"])
    monkeypatch.setenv("STREAMSERVE_OBSERVE__TARGETS_DIR", str(targets_dir))  # as `export $(stack env)` does
    pipeline = pipeline_factory(**{"observe.port": 0, "observe.host": "127.0.0.1"})
    rules = {r["name"] for g in _api(prometheus, "/api/v1/rules")["groups"] for r in g["rules"]}
    assert {"StreamserveTargetDown", "StreamserveStuck", "StreamserveLagNotConsumed"} <= rules
    expected = [f"{monitoring_env['ALERTMANAGER_URL']}/api/v2/alerts"]

    def alerts_go_to_the_alertmanager() -> bool:
        return [m["url"] for m in _api(prometheus, "/api/v1/alertmanagers")["activeAlertmanagers"]] == expected

    wait_until(alerts_go_to_the_alertmanager, 30, f"Prometheus sending alerts to {expected}", interval_s=0.5)

    worker = WorkerProcess(pipeline.path, tmp_path, "discovered")
    exporter = subprocess.Popen(
        [sys.executable, "-m", "streamserve", "lag-exporter", "-c", str(pipeline.path), "--port", "0"],
        stdout=(tmp_path / "lag-exporter.log").open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        worker_file = targets_dir / "discovered.json"
        wait_until(lambda: _written(worker, worker_file), 60, "the worker's target file")
        (entry,) = json.loads(worker_file.read_text())
        (address,) = entry["targets"]
        assert entry["labels"] == {"job": "streamserve", "group": pipeline.settings.kafka.group_id}
        seen: dict[str, str] = {}

        def both_scraped() -> bool:
            nonlocal seen
            seen = _up_targets(prometheus)
            return seen.get(address) == "streamserve" and "streamserve-lag" in seen.values()

        wait_until(both_scraped, 45, "Prometheus scraping the worker and the lag exporter", interval_s=1)
        worker.stop()
        assert not worker_file.exists(), "a worker that stopped cleanly is no longer a target"
    finally:
        worker.stop()
        exporter.send_signal(signal.SIGTERM)
        exporter.wait(15)
    assert not list(targets_dir.glob("*.json")), "the lag exporter removes its target on SIGTERM"
