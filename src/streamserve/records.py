"""Frozen records that flow between the pipeline's steps."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an input record came from: enough to commit it and to point at it from an output."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded input event with its origin."""

    source: Source
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record that failed a stage: routed to the dead-letter topic with its original bytes."""

    source: Source
    stage: str
    error_class: str
    message: str
    stacktrace: str | None = None
    """Formatted traceback of the exception that rejected the record, when there was one."""

    @classmethod
    def from_error(cls, source: Source, stage: str, exc: BaseException) -> Rejected:
        """The rejection of one record by an exception: its class, message and stack trace travel along."""
        return cls(
            source,
            stage,
            type(exc).__name__,
            str(exc) or repr(exc),
            "".join(traceback.format_exception(exc)),
        )


@dataclass(slots=True)
class FeatureBatch:
    """Events whose model inputs were built, with the float32 matrix in event order."""

    events: list[Event]
    matrix: np.ndarray
    missing_defaults: int = 0
    stale_defaults: int = 0
    degraded: bool = False
    """Redis was unavailable and every Redis feature took its default."""
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ModelOutputs:
    """What a model produced for a batch: one score per row, an optional class label per row."""

    score: np.ndarray
    label: np.ndarray | None
