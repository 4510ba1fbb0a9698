"""A real Prometheus server (Debian's `prometheus` package, started natively) that scrapes test workers.

One server per test session, started only when a test asks for it. It loads the project's alert rules
(monitoring/streamserve.rules.yml) and discovers its targets from a file the tests rewrite
(`Prometheus.scrape`), so each test points it at its own worker and labels the series with its pipeline.
A server that cannot start fails the run naming Prometheus, with its log tail - never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.integration.servers import ServerStartError

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "streamserve.rules.yml"
ENSURE_PROMETHEUS = REPO / "scripts" / "ensure-promtool"
JOB = "streamserve"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Prometheus:
    """A running Prometheus: its HTTP API, its target file and its log."""

    url: str
    process: subprocess.Popen[bytes]
    targets_path: Path
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def scrape(self, port: int | None, **labels: str) -> None:
        """Scrape 127.0.0.1:`port` (as job `streamserve`, with `labels` on every series); None: scrape nothing."""
        self.scrape_groups([{"targets": [f"127.0.0.1:{port}"], "labels": labels}] if port is not None else [])

    def scrape_groups(self, groups: list[dict[str, Any]]) -> None:
        """Scrape these file-discovery target groups (each: targets, labels) instead of the current ones."""
        staged = self.targets_path.with_suffix(".tmp")
        staged.write_text(json.dumps(groups))
        os.replace(staged, self.targets_path)  # file discovery must never read a half-written file

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a Prometheus HTTP API answer (fails with Prometheus's error and log tail)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
                answer = json.load(response)
        except (urllib.error.URLError, OSError) as exc:
            raise AssertionError(f"Prometheus API {path} failed: {exc}\n{self.log_tail()}") from exc
        assert answer["status"] == "success", f"Prometheus API {path}: {answer}"
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector of a PromQL query, evaluated now."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", f"{promql}: a {data['resultType']}, not an instant vector"
        return list(data["result"])

    def value(self, promql: str) -> float | None:
        """The single value of a PromQL query; None while it has no series."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: {len(result)} series, expected at most one"
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expected: dict[str, float], timeout_s: float) -> None:
        """Poll until every query has its expected value; fail listing what each query last answered."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {promql: self.value(promql) for promql in expected}
            if seen == expected:
                return
            if time.monotonic() > deadline:
                report = "\n".join(f"  {q}: {seen[q]} (expected {v})" for q, v in expected.items())
                raise AssertionError(f"Prometheus did not reach the expected values in {timeout_s:.0f}s:\n{report}")
            time.sleep(0.5)


def _config(targets_path: Path, rules: Path, alertmanager_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": JOB, "file_sd_configs": [{"files": [str(targets_path)]}]}],
    }
    if alertmanager_url is not None:
        target = alertmanager_url.removeprefix("http://")
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [target]}]}]}
    return config


def shortened_rules(for_s: int, window_s: int, source: Path = RULES) -> dict[str, Any]:
    """The project's alert rules with every `for:` cut to `for_s` seconds and every range window of minutes to
    `window_s` seconds, so a test sees them fire and resolve in seconds: built from the real file, never copied."""
    rules = yaml.safe_load(source.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[\d+m\]", f"[{window_s}s]", rule["expr"])
            if "for" in rule:
                rule["for"] = f"{for_s}s"
    return rules


def _prometheus_binary() -> str:
    ensured = subprocess.run([str(ENSURE_PROMETHEUS)], check=False, capture_output=True, text=True, timeout=600)
    found = shutil.which("prometheus")
    if found is None:
        raise ServerStartError(
            "Prometheus not found and scripts/ensure-promtool could not install Debian's prometheus package:\n"
            + ensured.stdout[-2000:]
            + ensured.stderr[-4000:]
        )
    return found


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prometheus(
    directory: Path, start_timeout_s: float = 60.0, rules: Path = RULES, alertmanager_url: str | None = None
) -> Iterator[Prometheus]:
    """Start Prometheus on a free 127.0.0.1 port with its data in `directory`; stop it (by PID) afterwards.
    With `alertmanager_url`, its alerts go there (resent every second, so a resolution arrives at once)."""
    binary = _prometheus_binary()
    targets_path = directory / "targets.json"
    targets_path.write_text("[]")
    config_path = directory / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(_config(targets_path, rules, alertmanager_url), sort_keys=False))
    log_path = directory / "prometheus.log"
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--rules.alert.resend-delay=1s",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, targets_path, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _ready(server.url):
            if process.poll() is not None:
                raise ServerStartError(f"Prometheus exited with {process.returncode} at start:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"Prometheus not ready after {start_timeout_s:.0f}s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@dataclass
class Alertmanager:
    """A running Alertmanager: its API (v2) and its log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def active(self) -> dict[str, dict[str, str]]:
        """The alerts Alertmanager holds as active now (not resolved), by alert name: their labels."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/alerts?active=true", timeout=10) as response:
                alerts = json.load(response)
        except (urllib.error.URLError, OSError) as exc:
            raise AssertionError(f"Alertmanager API failed: {exc}\n{self.log_tail()}") from exc
        return {a["labels"]["alertname"]: a["labels"] for a in alerts if a["status"]["state"] == "active"}


def _alertmanager_binary() -> str:
    ensured = subprocess.run([str(ENSURE_PROMETHEUS)], check=False, capture_output=True, text=True, timeout=600)
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        raise ServerStartError(
            "Alertmanager not found and scripts/ensure-promtool could not install Debian's prometheus-alertmanager:\n"
            + ensured.stdout[-2000:]
            + ensured.stderr[-4000:]
        )
    return found


@contextlib.contextmanager
def alertmanager(directory: Path, start_timeout_s: float = 60.0) -> Iterator[Alertmanager]:
    """Start Alertmanager (no receiver, no cluster) on a free 127.0.0.1 port; stop it (by PID) afterwards."""
    binary = _alertmanager_binary()
    config_path = directory / "alertmanager.yml"
    route = {"receiver": "api-only", "group_by": ["alertname"], "group_wait": "0s", "group_interval": "1s"}
    config_path.write_text(yaml.safe_dump({"route": route, "receivers": [{"name": "api-only"}]}))
    log_path = directory / "alertmanager.log"
    port = free_port()
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.path={directory / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # a single instance: no gossip port
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Alertmanager(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _ready(server.url):
            if process.poll() is not None:
                raise ServerStartError(f"Alertmanager exited with {process.returncode} at start:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"Alertmanager not ready after {start_timeout_s:.0f}s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
