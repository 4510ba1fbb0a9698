"""Alerts that fire when it matters, read from a real Alertmanager: a frozen worker, a Redis outage under
`redis.on_error: wait`, a killed worker; each alert resolves once its fault ends.

Kafka is the shared stack's; Redis is a redis-server of this test (stopped and started by PID, on its own port),
so the shared Redis is never touched. Prometheus loads the project's rules with `for:` and range windows cut
to seconds (shortened_rules: built from monitoring/streamserve.rules.yml). The lag comes from
`streamserve lag-exporter`, a process apart from the worker.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from streamserve.demo.data import Entities, make_events
from streamserve.demo.train import TrainedModel
from tests.integration.harness import Pipeline, WorkerProcess, produce_events, wait_until
from tests.integration.prometheus import Alertmanager, alertmanager, free_port, prometheus, shortened_rules
from tests.integration.servers import Servers, ServerStartError

BACKLOG = 1500  # events produced during a fault: above the 1000 of StreamserveLagNotConsumed
FROZEN = {"StreamserveStuck", "StreamserveLagNotConsumed", "StreamserveTargetDown", "StreamserveNoWorker"}
REDIS_DOWN = {"StreamserveStuck", "StreamserveLagNotConsumed"}
KILLED = {"StreamserveTargetDown", "StreamserveNoWorker"}


class RedisServer:
    """A redis-server of this test on a fixed free port, stopped and started again by PID."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server not found (scripts/stack installs it with apt-get)")
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, cwd=self.directory, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise ServerStartError(f"redis-server on port {self.port} did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path)
        server.start()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def monitoring(tmp_path: Path) -> Iterator[tuple[Callable[[list[dict[str, object]]], None], Alertmanager]]:
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(shortened_rules(for_s=2, window_s=8), sort_keys=False))
    (tmp_path / "am").mkdir()
    (tmp_path / "prom").mkdir()
    try:
        with (
            alertmanager(tmp_path / "am") as manager,
            prometheus(tmp_path / "prom", rules=rules, alertmanager_url=manager.url) as server,
        ):
            yield server.scrape_groups, manager
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


def load_features(pipeline: Pipeline, client: redis.Redis, entities: Entities) -> None:
    writes = client.pipeline(transaction=False)
    for card_id, values in entities.cards.items():
        writes.hset(f"{pipeline.prefix}:card:{card_id}", mapping=values)
    for merchant_id, values in entities.merchants.items():
        writes.hset(f"{pipeline.prefix}:merchant:{merchant_id}", mapping=values)
    writes.execute()


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (urllib.error.URLError, OSError):
        return 0


def ready(worker: WorkerProcess, port: int) -> bool:
    worker.assert_alive()
    return probe(port, "/readyz") == 200


def wait_alerts(manager: Alertmanager, expected: set[str], timeout_s: float, what: str) -> set[str]:
    """Until the alerts `expected` are all active in Alertmanager (an empty set: until none is); what is active."""
    seen: set[str] = set()

    def reached() -> bool:
        nonlocal seen
        seen = set(manager.active())
        return expected <= seen if expected else not seen

    try:
        wait_until(reached, timeout_s, what, interval_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: Alertmanager holds {sorted(seen)}, expected {sorted(expected)}") from None
    return seen


def test_frozen_worker_redis_outage_and_killed_worker_reach_alertmanager_and_resolve(
    stack: Servers,
    models: dict[str, TrainedModel],
    entities: Entities,
    own_redis: RedisServer,
    monitoring: tuple[Callable[[list[dict[str, object]]], None], Alertmanager],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scrape, manager = monitoring
    monkeypatch.setenv("STREAMSERVE_REDIS__URL", own_redis.url)  # REDIS_URL (the shared stack's) yields to it
    port, lag_port = free_port(), free_port()
    # liveness_timeout_s 1: /healthz stays 200 through the outage only because the wait is by policy
    overrides = {"observe.port": port, "observe.host": "127.0.0.1", "observe.stalled_after_s": 2,
                 "observe.liveness_timeout_s": 1, "redis.on_error": "wait", "redis.max_backoff_ms": 300,
                 "batch.max_wait_ms": 20}  # fmt: skip
    pipeline = Pipeline(stack.bootstrap_servers, own_redis.url, tmp_path, models["v1"].path, 2, overrides)
    pipeline.create_topics()
    client = redis.Redis.from_url(own_redis.url)
    load_features(pipeline, client, entities)
    events = make_events(entities, 10 * BACKLOG, seed=2601)
    exporter = subprocess.Popen(
        [sys.executable, "-m", "streamserve", "lag-exporter", "-c", str(pipeline.path), "--port", str(lag_port),
         "--host", "127.0.0.1"],
        stdout=(tmp_path / "lag-exporter.log").open("ab"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = WorkerProcess(pipeline.path, tmp_path, "alerted")
    try:
        scrape([
            {"targets": [f"127.0.0.1:{port}"], "labels": {"job": "streamserve"}},
            {"targets": [f"127.0.0.1:{lag_port}"], "labels": {"job": "streamserve-lag"}},
        ])  # fmt: skip
        wait_until(lambda: ready(worker, port), 60, "the worker's /readyz")
        produce_events(pipeline, [next(events) for _ in range(50)])
        wait_alerts(manager, set(), 30, "a healthy worker: no alert")

        # 1. Frozen (SIGSTOP): no scrape, no batch, the backlog grows at the broker.
        worker.process.send_signal(signal.SIGSTOP)
        produce_events(pipeline, [next(events) for _ in range(BACKLOG)])
        wait_alerts(manager, FROZEN, 45, "alerts of a frozen worker")
        worker.process.send_signal(signal.SIGCONT)
        wait_alerts(manager, set(), 45, "the frozen worker's alerts resolved after SIGCONT")

        # 2. Redis stops under `wait`: the worker stays alive and scraped, unready while a batch waits.
        client.save()  # the restart loads the features again (dump.rdb in its directory)
        own_redis.stop()
        produce_events(pipeline, [next(events) for _ in range(BACKLOG)])
        wait_until(lambda: probe(port, "/readyz") == 503, 30, "/readyz 503 while Redis is down")
        active = wait_alerts(manager, REDIS_DOWN, 45, "alerts of a Redis outage")
        assert "StreamserveTargetDown" not in active, "the waiting worker still answers its scrape"
        assert probe(port, "/readyz") == 503, "unready while a batch waits for Redis"
        assert probe(port, "/healthz") == 200, "alive: it waits by policy, a restart would not help"
        own_redis.start()
        wait_until(lambda: probe(port, "/readyz") == 200, 30, "/readyz 200 once Redis is back")
        wait_alerts(manager, set(), 45, "the Redis outage's alerts resolved")

        # 3. Killed (SIGKILL): the target is down and no worker exports a heartbeat; a new worker resolves both.
        worker.kill()
        wait_alerts(manager, KILLED, 45, "alerts of a killed worker")
        worker = WorkerProcess(pipeline.path, tmp_path, "replacement")
        wait_until(lambda: ready(worker, port), 60, "the replacement's /readyz")
        wait_alerts(manager, set(), 45, "the killed worker's alerts resolved by its replacement")
    finally:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGCONT)
            worker.stop()
        exporter.terminate()
        exporter.wait(15)
