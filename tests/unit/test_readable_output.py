"""Output a person reads (issue 27, item 4): librdkafka's start-up warnings kept at DEBUG unless they persist,
progress lines for `produce` and `features load` off a terminal, the demo's worker log in a text file."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamserve.demo.logfile import log_to_file
from streamserve.observe.kafkalog import LIBRDKAFKA_LOGGER, TransientAtStart
from streamserve.observe.progress import Progress


@pytest.fixture
def root_handlers() -> Iterator[None]:
    """log_to_file replaces the root logger's handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(LIBRDKAFKA_LOGGER, level, __file__, 1, message, None, None)


def test_a_transient_start_up_warning_is_debug_unless_it_persists() -> None:
    now = [0.0]
    transient = TransientAtStart(grace_s=30.0, clock=lambda: now[0])
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.INFO)
    line = "COMMITFAIL [thrd:main]: Offset commit failed: Broker: Coordinator load in progress"
    assert not transient.filter(record(line)), "young: DEBUG, and DEBUG is off"
    now[0] = 12.0
    assert not transient.filter(record(line))
    now[0] = 31.0
    persisting = record(line)
    assert transient.filter(persisting), "still there after the grace: it persists, it is shown"
    assert persisting.levelno == logging.WARNING
    assert transient.filter(record("FAIL [thrd:127.0.0.1:1/bootstrap]: Connection refused")), "not a transient one"


def test_a_transient_warning_is_shown_as_debug_when_debug_is_on() -> None:
    transient = TransientAtStart(clock=lambda: 0.0)
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    logger.setLevel(logging.DEBUG)
    try:
        young = record("Group coordinator not available")
        assert transient.filter(young)
        assert young.levelname == "DEBUG"
    finally:
        logger.setLevel(logging.NOTSET)


def test_progress_lines_name_what_is_counted() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(1000, stream, every_s=5.0, clock=lambda: now[0], verb="produced", unit="events")
    now[0] = 5.0
    progress.advance(500)
    assert stream.getvalue() == "produced 500 of 1,000 events (50%), 100 events/s, ETA 5s\n"
    now[0] = 0.0
    loaded = Progress(None, io.StringIO(), clock=lambda: now[0], verb="wrote", unit="rows")
    now[0] = 2.0
    loaded.advance(40)
    loaded.close()
    assert loaded.stream.getvalue() == "wrote 40 rows, 20 rows/s\n"


def test_the_demo_leaves_log_lines_in_a_text_file_not_on_the_terminal(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], root_handlers: None
) -> None:
    path = log_to_file(tmp_path / "data", "demo-fraud")
    logging.getLogger("streamserve.app").info("worker started: group %s", "fraud-scorer")
    logging.getLogger(LIBRDKAFKA_LOGGER).warning("FAIL [thrd:main]: Connection refused")
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out == ""
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert "worker started: group fraud-scorer" in lines[0]
    assert not any(line.lstrip().startswith("{") for line in lines), "text, never JSON"
