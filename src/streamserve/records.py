"""Immutable records that flow between the pipeline's steps."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

Headers = list[tuple[str, str | bytes | None]]


class Source(NamedTuple):
    """Where an input record came from: enough to commit it and to point at it from an output.

    A named tuple, like Event: one is made per record on the hot path, and a frozen dataclass costs ~4x as
    much to construct (its __init__ goes through object.__setattr__ per field).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int


class Event(NamedTuple):
    """A decoded input event with its origin."""

    source: Source
    fields: dict[str, Any]


_BY_OFFSET = attrgetter("offset")


def highest_offsets(sources: Sequence[Source]) -> dict[tuple[str, int], int]:
    """The highest offset of the records of each (topic, partition)."""
    return {(s.topic, s.partition): s.offset for s in sorted(sources, key=_BY_OFFSET)}  # a partition's last wins


def offset_bounds(sources: Sequence[Source]) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """The lowest and the highest offset of the records of each (topic, partition), from one sort."""
    ordered = sorted(sources, key=_BY_OFFSET)
    lowest = {(s.topic, s.partition): s.offset for s in reversed(ordered)}
    return lowest, {(s.topic, s.partition): s.offset for s in ordered}


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
    """Events whose features were built, with one column per feature in event order.

    Numeric features are float64 arrays (rows,) or (rows, width); text features are object arrays of str.
    """

    events: list[Event]
    columns: dict[str, np.ndarray]
    missing_defaults: int = 0
    stale_defaults: int = 0
    degraded: bool = False
    """Redis was unavailable and every Redis feature took its default."""
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def matrix(self) -> np.ndarray:
        """The numeric features side by side as one float32 matrix (rows, columns), in feature order."""
        numeric = [c if c.ndim == 2 else c[:, None] for c in self.columns.values() if c.dtype != object]
        return np.hstack(numeric).astype(np.float32) if numeric else np.empty((len(self.events), 0), np.float32)

    def select(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The columns of the given rows."""
        return {name: column[rows] for name, column in self.columns.items()}


@dataclass(frozen=True, slots=True)
class ModelOutputs:
    """What a model produced for a batch, one entry per row.

    ``score`` is the positive/chosen class probability or the regression value; ``label`` int class
    labels, ``label_text`` string class labels; ``probabilities`` the whole
    (rows, classes) matrix with ``classes`` naming its columns; ``extra`` further named numeric outputs.
    """

    score: np.ndarray
    label: np.ndarray | None = None
    label_text: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def take(self, rows: np.ndarray) -> ModelOutputs:
        """The outputs of the given rows."""

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[rows]

        return ModelOutputs(
            self.score[rows],
            pick(self.label),
            pick(self.label_text),
            pick(self.probabilities),
            self.classes,
            {name: values[rows] for name, values in self.extra.items()},
        )
