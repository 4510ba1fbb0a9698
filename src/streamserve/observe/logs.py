"""Logging setup: JSON lines with the worker's and the batch's context, text on a terminal, secrets masked.

Every line passes through :class:`Redactor`, which masks values registered as secrets (the SASL password,
the Redis URL's password: :func:`register_secret`) and anything that looks like one (``password=...``,
``user:password@`` in URLs), whatever module logged it and however it formatted its message.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

from streamserve.observe import context

LogFormat = Literal["auto", "json", "text"]
MASK = "***"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)((?:sasl[._]?)?(?:password|passwd|secret|token|api[_-]?key|credentials?)[\"']?\s*[=:]\s*[\"']?)"
    r"[^\s\"',;&}]+"
)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@", re.IGNORECASE)
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it would appear in a log line."""
    if value and len(value) >= 4:  # shorter values would mask ordinary words
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets and secret-looking values replaced by ``***``."""
    for secret in sorted(_secrets, key=len, reverse=True):  # a longer secret may contain a shorter one
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    return _SECRET_ASSIGNMENT.sub(rf"\1{MASK}", text)


class ContextFilter(logging.Filter):
    """Adds the worker id, the current batch (topic, partitions, offsets, batch id, model version), the trace id."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, object] = {}
        if (worker := context.worker_id()) is not None:
            fields["worker_id"] = worker
        if (batch := context.current_batch.get()) is not None:
            fields.update(batch.fields())
        if trace_id := _current_trace_id():
            fields["trace_id"] = trace_id
        record.__dict__.update(fields)  # as logging's own `extra=` does: the formatters read record attributes
        record.context = "".join(f" {k}={v}" for k, v in fields.items() if k != "worker_id") if fields else ""
        return True


def _current_trace_id() -> str | None:
    from opentelemetry import trace

    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else None


class _RedactingJson(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _RedactingText(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def formatter(log_format: LogFormat, stream: object = None) -> logging.Formatter:
    """The formatter for ``log_format``; ``auto`` is text on a terminal, JSON otherwise."""
    if log_format == "auto":
        isatty = getattr(stream if stream is not None else sys.stderr, "isatty", None)
        log_format = "text" if isatty is not None and isatty() else "json"
    if log_format == "text":
        return _RedactingText(_TEXT_FORMAT)
    return _RedactingJson(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        reserved_attrs=[*_RESERVED, "context"],
        timestamp=False,
    )


_RESERVED = [
    "args", "created", "exc_info", "exc_text", "filename", "funcName", "levelno", "lineno", "module", "msecs",
    "msg", "pathname", "process", "processName", "relativeCreated", "stack_info", "thread", "threadName",
    "taskName",
]  # fmt: skip


def setup_logging(level: str, log_format: LogFormat = "auto", stream: object = None) -> logging.Handler:
    """Route every logger (ours, the libraries') to one stderr handler with context and redaction."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(formatter(log_format, handler.stream))
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # The Schema Registry client's HTTP layer writes one INFO line per request: WARNING unless DEBUG is asked for.
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(
            max(root.level, logging.WARNING) if root.level > logging.DEBUG else root.level
        )
    return handler


QUIET_LOGGERS = ("httpx", "httpcore", "httpx2", "httpcore2")  # httpx2: the registry client of newer confluent-kafka
