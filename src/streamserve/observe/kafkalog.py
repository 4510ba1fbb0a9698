"""librdkafka's own log lines through a Python logger: each repeated line passed only now and then, and the
warnings a starting cluster or group gives for a few seconds kept at DEBUG unless they persist."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

LIBRDKAFKA_LOGGER = "streamserve.librdkafka"
"""The Python logger every Kafka client logs through (config.KafkaSettings.common passes it as `logger`)."""


class RepeatedLines(logging.Filter):
    """librdkafka logs a failing connection on every reconnect attempt: pass the 1st, 10th, 100th... time a
    line is seen (saying how often), drop the others."""

    VARYING = re.compile(r"\d+ms|\d+ identical error\(s\) suppressed")
    MAX_LINES = 1000

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record when its count is a power of ten."""
        line = self.VARYING.sub("#", record.getMessage())
        if len(self._seen) >= self.MAX_LINES:
            self._seen.clear()
        count = self._seen.get(line, 0) + 1
        self._seen[line] = count
        if count == 1:
            return True
        if 10 ** (len(str(count)) - 1) != count:
            return False
        record.msg, record.args = f"{record.getMessage()} (seen {count} times)", None
        return True


TRANSIENT = re.compile(
    r"coordinator load in progress|not coordinator|coordinator not available|coordinator is loading"
    r"|leader not available|unknown topic or partition|group (is )?rebalancing|rebalance in progress",
    re.IGNORECASE,
)
"""What a broker answers for a few seconds while a cluster, a topic or a group starts: it passes by itself."""
TRANSIENT_GRACE_S = 30.0


class TransientAtStart(logging.Filter):
    """librdkafka's start-up warnings ("Coordinator load in progress", "Leader not available"...) are DEBUG while
    they are younger than ``grace_s`` (since their first appearance); one still seen after that persists, and is
    passed at its own level: something is wrong."""

    def __init__(self, grace_s: float = TRANSIENT_GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.grace_s = grace_s
        self._clock = clock
        self._first: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote a young transient warning to DEBUG (dropped unless DEBUG is on)."""
        if record.levelno < logging.WARNING:
            return True
        message = record.getMessage()
        found = TRANSIENT.search(message)
        if found is None:
            return True
        now = self._clock()
        first = self._first.setdefault(found.group(0).lower(), now)
        if now - first >= self.grace_s:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def librdkafka_logger() -> logging.Logger:
    """The logger of librdkafka's own log lines (instead of its `%3|...|FAIL|` lines on stderr)."""
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    if not any(isinstance(f, TransientAtStart) for f in logger.filters):
        logger.filters.insert(0, TransientAtStart())  # before the repeat counter: a demoted line is not counted
    if not any(isinstance(f, RepeatedLines) for f in logger.filters):
        logger.addFilter(RepeatedLines())
    return logger
