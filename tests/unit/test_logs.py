"""Log lines: JSON with the worker's and the batch's context, text on a terminal, secrets never shown."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from streamserve.config import load_settings
from streamserve.observe import context
from streamserve.observe.logs import register_secret, setup_logging
from streamserve.records import Source

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fraud" / "pipeline.yaml"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _source(partition: int, offset: int) -> Source:
    return Source("payments", partition, offset, b"k", b"v", None, 0)


@pytest.mark.usefixtures("restore_root")
def test_json_lines_carry_worker_batch_and_trace() -> None:
    stream = io.StringIO()
    setup_logging("INFO", "auto", stream)  # not a terminal: JSON
    context.set_worker("worker-7")
    batch = context.BatchContext.of(42, [_source(1, 10), _source(1, 12), _source(3, 5)], "v2")
    tracer = TracerProvider().get_tracer("test")
    with context.batch_scope(batch), tracer.start_as_current_span("batch") as span:
        logging.getLogger("streamserve.test").warning("scored %d records", 3)
    logging.getLogger("streamserve.test").info("between batches")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "scored 3 records"
    assert first["level"] == "WARNING"
    assert first["worker_id"] == "worker-7"
    assert first["topic"] == "payments"
    assert first["partitions"] == [1, 3]
    assert first["offsets"] == {"1": "10-12", "3": "5-5"}
    assert first["batch_id"] == 42
    assert first["model_version"] == "v2"
    assert first["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert second["worker_id"] == "worker-7"
    assert "batch_id" not in second
    assert "trace_id" not in second


@pytest.mark.usefixtures("restore_root")
def test_text_on_a_terminal() -> None:
    stream = Terminal()
    setup_logging("INFO", "auto", stream)
    with context.batch_scope(context.BatchContext.of(7, [_source(0, 1)], "v1")):
        logging.getLogger("streamserve.test").info("hello")
    line = stream.getvalue().strip()
    assert not line.startswith("{")
    assert "INFO streamserve.test: hello" in line
    assert "batch_id=7" in line


@pytest.mark.usefixtures("restore_root")
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_from_the_config_are_never_logged(log_format: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSERVE_KAFKA__SASL_PASSWORD", "kafka-s3cret-pw")
    monkeypatch.setenv("STREAMSERVE_REDIS__PASSWORD", "redis-s3cret-pw")  # the URL may not hold it (refused)
    settings = load_settings(EXAMPLE)
    stream = io.StringIO()
    setup_logging("DEBUG", log_format, stream)  # type: ignore[arg-type]
    log = logging.getLogger("streamserve.test")
    assert settings.redis.password is not None
    log.info("redis password %s", settings.redis.password.get_secret_value())
    log.info("connecting to %s", "rediss://default:other-s3cret@redis.example:6380/0")
    log.info("librdkafka config %s", {"sasl.password": settings.kafka.sasl_password.get_secret_value()})  # type: ignore[union-attr]
    log.info("settings: %r", settings)
    try:
        raise RuntimeError("auth failed for kafka-s3cret-pw")
    except RuntimeError:
        log.exception("could not connect")
    log.info("token=abc123def api_key: xyz987")
    output = stream.getvalue()
    for secret in ("kafka-s3cret-pw", "redis-s3cret-pw", "other-s3cret", "abc123def", "xyz987"):
        assert secret not in output, f"{secret} leaked into:\n{output}"
    assert "rediss://default:***@redis.example:6380/0" in output
    assert "auth failed for ***" in output


def test_registered_short_values_are_not_masked_everywhere() -> None:
    register_secret("a")  # too short to be a secret worth masking: it would garble every line
    stream = io.StringIO()
    handler = setup_logging("INFO", "text", stream)
    try:
        logging.getLogger("streamserve.test").info("a batch")
        assert "a batch" in stream.getvalue()
    finally:
        logging.getLogger().removeHandler(handler)
