"""The demo's own output on the terminal, every log line (the worker's, its Kafka and Redis clients') in a file.

A person reads the demo's steps and summary; the worker's log, text whatever the terminal, is kept in a file
the demo names, for when a step fails or one wants to see what the worker did.
"""

from __future__ import annotations

from pathlib import Path

from streamserve.observe.logs import setup_logging


def log_to_file(directory: Path, name: str, level: str = "INFO") -> Path:
    """Route every logger to the text file ``directory/name.log`` (appended to) and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.log"
    stream = path.open("a", encoding="utf-8", buffering=1)  # line-buffered: readable while the demo runs
    setup_logging(level, "text", stream)
    return path
