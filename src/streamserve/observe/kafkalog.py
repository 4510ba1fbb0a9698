"""librdkafka's own log lines through a Python logger, each repeated line passed only now and then."""

from __future__ import annotations

import logging
import re

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


def librdkafka_logger() -> logging.Logger:
    """The logger of librdkafka's own log lines (instead of its `%3|...|FAIL|` lines on stderr)."""
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    if not any(isinstance(f, RepeatedLines) for f in logger.filters):
        logger.addFilter(RepeatedLines())
    return logger
