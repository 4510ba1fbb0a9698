"""A Schema Registry that accepts connections and never answers (a hung Apicurio, a stuck proxy) costs the worker,
the decoder and `schemas check` about (1 + kafka.schema_registry_retries) x kafka.schema_registry_timeout_s plus
the backoff pauses, and ends in one line naming its URL. The registry is a listening socket on 127.0.0.1 that
accepts and never writes a byte: no Apicurio, no Kafka."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fastavro
import pytest

from streamserve.config import PipelineSettings, load_settings
from streamserve.errors import DecodeError, RegistryUnavailable, RegistryUnreachable
from streamserve.pipeline.decode import RegistryDecoder, encode_wire
from streamserve.pipeline.subjects import prediction_prefix

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fraud" / "pipeline.yaml"
TIMEOUT_S, RETRIES, BACKOFF_MS, MAX_BACKOFF_MS = 0.5, 1, 100, 200
MARGIN_S = 5.0
"""For a loaded machine: the bound is a correctness bound (no request waits forever), not a speed target."""
READER = {"type": "record", "name": "R", "namespace": "t", "fields": [{"name": "a", "type": "string"}]}


def bound_s(timeout_s: float = TIMEOUT_S, retries: int = RETRIES, backoff_ms: int = BACKOFF_MS,
            max_backoff_ms: int = MAX_BACKOFF_MS) -> float:  # fmt: skip
    """The longest a request may take: every attempt timing out, with the longest pause (full jitter draws at most
    min(backoff * 2^i, max)) before each retry."""
    pauses = sum(min(backoff_ms * 2**i, max_backoff_ms) for i in range(retries)) / 1000
    return (1 + retries) * timeout_s + pauses


class SilentServer:
    """Accepts every connection on 127.0.0.1 and holds it open without reading or writing a byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-registry", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def settings_at(url: str, **kafka: Any) -> PipelineSettings:
    """The fraud example with output.wire_format, its registry at `url` and the short timeouts above."""
    settings = load_settings(EXAMPLE)
    registry = {
        "schema_registry_url": url,
        "schema_registry_timeout_s": TIMEOUT_S,
        "schema_registry_retries": RETRIES,
        "schema_registry_backoff_ms": BACKOFF_MS,
        "schema_registry_max_backoff_ms": MAX_BACKOFF_MS,
        **kafka,
    }
    return settings.model_copy(
        update={
            "kafka": settings.kafka.model_copy(update=registry),
            "output": settings.output.model_copy(update={"wire_format": True}),
        }
    )


def assert_one_line_naming(message: str, url: str) -> None:
    assert "\n" not in message, message
    assert url in message, message
    assert "Traceback" not in message, message


def test_the_bound_is_the_timeout_times_the_attempts_plus_the_pauses() -> None:
    assert bound_s(10.0, 2, 200, 5000) == pytest.approx(30.6)  # the defaults: 3 x 10 s, pauses of <= 0.2 and 0.4 s
    assert bound_s(0.5, 0, 100, 200) == 0.5


def test_the_worker_start_gives_up_on_a_registry_that_never_answers(silent: SilentServer) -> None:
    """prediction_prefix (build_worker, backtest, replay) under output.wire_format: RegistryUnreachable, a
    StreamServeError the CLI prints as its one line, after every attempt timed out - not a wait without end."""
    settings = settings_at(silent.url)
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable) as caught:
        prediction_prefix(settings)
    took = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= took <= bound_s() + MARGIN_S, took
    assert len(silent.accepted) == 1 + RETRIES, "each attempt of the client waited on a connection of its own"
    message = str(caught.value)
    assert_one_line_naming(message, silent.url)
    assert "did not answer when asked to register the prediction schema" in message
    assert "kafka.schema_registry_url" in message, "what to do"


def payload() -> bytes:
    return encode_wire(7, fastavro.parse_schema(READER), {"a": "x"})


@pytest.mark.parametrize(("policy", "error"), [("fail", RegistryUnavailable), ("dead_letter", DecodeError)])
def test_a_schema_id_the_registry_never_answers_ends_in_the_policy_within_the_bound(
    silent: SilentServer, policy: str, error: type[Exception]
) -> None:
    settings = settings_at(silent.url, schema_registry_on_unavailable=policy)
    decoder = RegistryDecoder.from_settings(settings.kafka, fastavro.parse_schema(READER))
    started = time.monotonic()
    with pytest.raises(error) as caught:
        decoder(payload())
    took = time.monotonic() - started
    assert TIMEOUT_S * 0.9 <= took <= bound_s() + MARGIN_S, took
    message = str(caught.value)
    assert_one_line_naming(message, silent.url)
    assert message.startswith("Schema Registry unavailable fetching schema id 7 from "), message


def test_under_wait_each_round_of_a_hung_fetch_is_bounded_and_says_so(
    silent: SilentServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`wait` keeps retrying until the registry answers (nothing is lost), but each round ends: the client's
    attempts time out, a warning names the URL, then the decoder's own pause."""

    class Paused(Exception):
        pass

    def pause(seconds: float) -> None:
        raise Paused(seconds)

    settings = settings_at(silent.url)
    conf = settings.kafka.schema_registry_config()
    assert conf is not None
    decoder = RegistryDecoder.from_config(conf, fastavro.parse_schema(READER), on_unavailable="wait", sleep=pause)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "streamserve.pipeline.decode"), pytest.raises(Paused):
        decoder(payload())
    assert time.monotonic() - started <= bound_s() + MARGIN_S
    (warning,) = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert_one_line_naming(warning, silent.url)
    assert "retry 1 (until it answers)" in warning


def test_schemas_check_against_a_registry_that_never_answers_is_one_line(silent: SilentServer) -> None:
    """`streamserve schemas check --timeout 0.5` as CI runs it: exit 2 and one stderr line naming the URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
    env |= {
        "PYTHONPATH": str(REPO / "src"),
        "STREAMSERVE_KAFKA__SCHEMA_REGISTRY_URL": silent.url,
        "STREAMSERVE_KAFKA__SCHEMA_REGISTRY_RETRIES": str(RETRIES),
        "STREAMSERVE_KAFKA__SCHEMA_REGISTRY_BACKOFF_MS": str(BACKOFF_MS),
        "STREAMSERVE_KAFKA__SCHEMA_REGISTRY_MAX_BACKOFF_MS": str(MAX_BACKOFF_MS),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "streamserve", "schemas", "check", "-c", str(EXAMPLE), "--timeout", str(TIMEOUT_S)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,  # only so a hang fails this test instead of the suite
    )
    took = time.monotonic() - started
    assert took <= bound_s() + MARGIN_S + 30, took  # + the interpreter's start and imports
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    assert_one_line_naming(lines[0], silent.url)
    assert f"the Schema Registry at {silent.url} did not answer the schemas check" in lines[0]
    assert json.dumps(TIMEOUT_S) + "s each" in lines[0], lines[0]
