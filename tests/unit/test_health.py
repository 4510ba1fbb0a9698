"""Health probes: /healthz fails only when a restart would help, /readyz while the worker cannot make progress."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamserve.observe.metrics import HealthState, ObserveServer, TargetFile, WorkerMetrics
from streamserve.observe.telemetry import Telemetry


class Stage:
    """The batch's open stage as the telemetry would report it, set by the test."""

    def __init__(self) -> None:
        self.current: tuple[str, float] | None = None

    def __call__(self) -> tuple[str, float] | None:
        return self.current


def health(stage: Stage, ready: bool = True, waits: tuple[str, ...] = ()) -> HealthState:
    return HealthState(60, lambda: ready, stalled_after_s=30, current_stage=stage, waits_by_policy=waits)


def test_a_stalled_loop_fails_liveness_naming_its_stage() -> None:
    stage = Stage()
    state = health(stage)
    assert state.liveness_problem() is None
    state.last_loop -= 61
    stage.current = ("infer", time.monotonic() - 61)
    assert state.liveness_problem() == "loop stalled in stage infer for 61s"


def test_waiting_by_policy_is_unready_but_alive() -> None:
    stage = Stage()
    state = health(stage, waits=("enrich",))
    stage.current = ("enrich", time.monotonic() - 90)
    state.last_loop -= 90
    assert state.liveness_problem() is None, "a restart would wait for Redis the same way"
    assert state.readiness_problem() == "a batch has waited in stage enrich for 90s"
    stage.current = None
    state.beat()
    assert state.readiness_problem() is None, "ready again once the batch went through"


def test_a_short_stage_keeps_the_worker_ready() -> None:
    stage = Stage()
    state = health(stage)
    stage.current = ("enrich", time.monotonic() - 5)
    assert state.readiness_problem() is None


def test_failed_and_not_joined_are_unready() -> None:
    assert "not joined" in (health(Stage(), ready=False).readiness_problem() or "")
    state = health(Stage())
    state.failed("fenced: another instance took the transactional id")
    assert state.readiness_problem() == "fenced: another instance took the transactional id"
    assert state.live()


def test_the_telemetry_reports_the_innermost_open_stage() -> None:
    metrics = WorkerMetrics("w", lambda: ("m", "v1"), lambda: 0)
    telemetry = Telemetry(metrics, None)
    assert telemetry.current_stage() is None
    with telemetry.batch([], "v1"):
        assert telemetry.current_stage() is not None
        assert telemetry.current_stage()[0] == "batch"  # type: ignore[index]
        with telemetry.stage("process"), telemetry.stage("enrich"):
            assert telemetry.current_stage()[0] == "enrich"  # type: ignore[index]
        assert telemetry.current_stage()[0] == "batch"  # type: ignore[index]
    assert telemetry.current_stage() is None
    metrics.shutdown()


@pytest.fixture
def served() -> Iterator[tuple[HealthState, Stage, int]]:
    stage = Stage()
    state = health(stage, waits=("enrich",))
    server = ObserveServer("127.0.0.1", 0, state)
    server.start()
    yield state, stage, server.port
    server.stop()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_the_probes_answer_503_with_the_reason(served: tuple[HealthState, Stage, int]) -> None:
    state, stage, port = served
    assert get(port, "/readyz") == (200, "ready\n")
    stage.current = ("enrich", time.monotonic() - 45)
    state.last_loop -= 200
    assert get(port, "/readyz") == (503, "a batch has waited in stage enrich for 45s\n")
    assert get(port, "/healthz") == (200, "ok\n")
    stage.current = ("encode", time.monotonic() - 200)
    assert get(port, "/healthz") == (503, "loop stalled in stage encode for 200s\n")


def test_the_heartbeat_is_exported_with_the_group() -> None:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    state = health(Stage())
    state.last_batch = 1_700_000_000.0
    reader = PrometheusMetricReader()
    metrics = WorkerMetrics("w", lambda: ("m", "v1"), lambda: 0, readers=[reader], last_batch=lambda: state.last_batch,
                            group="scoring")  # fmt: skip
    try:
        scrape = generate_latest(REGISTRY).decode()
    finally:
        metrics.shutdown()  # unregisters the reader
    assert re.search(r'^streamserve_last_batch_timestamp_seconds\{group="scoring",.*\} 1\.7e\+09$', scrape, re.M)


def test_a_serving_worker_names_itself_in_the_discovery_directory(tmp_path: Path) -> None:
    target = TargetFile(tmp_path / "targets", "w1", {"job": "streamserve", "group": "scoring"})
    server = ObserveServer("0.0.0.0", 0, health(Stage()), target)
    server.start()
    try:
        (entry,) = json.loads((tmp_path / "targets" / "w1.json").read_text())
        assert entry == {"targets": [f"127.0.0.1:{server.port}"], "labels": {"job": "streamserve", "group": "scoring"}}
    finally:
        server.stop()
    assert not (tmp_path / "targets" / "w1.json").exists(), "a clean stop is no longer a target"


def test_a_client_that_hangs_up_costs_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """A scraper or probe gone mid-reply (BrokenPipeError after a paused worker resumes) is not socketserver's
    traceback on stderr; another failure is one log line, not a traceback either."""
    server = ObserveServer("127.0.0.1", 0, health(Stage()))
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"), ValueError("odd")):
            try:
                raise error
            except (ConnectionError, ValueError):
                server.server.handle_error(None, ("127.0.0.1", 5555))
    finally:
        server.server.server_close()
    assert capsys.readouterr().err == ""
