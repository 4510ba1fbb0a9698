"""Per-worker and per-batch context in contextvars, so logs, spans and metrics pick it up without arguments.

The worker sets its id once; the batch loop opens a :func:`batch_scope` around each micro-batch. Anything
logged inside it (by any module) carries the batch's topic, partitions, offset range, batch id, model version
and trace id.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property

from streamserve.records import Source, offset_bounds


@dataclass(frozen=True)
class BatchContext:
    """What identifies one micro-batch in logs and spans."""

    batch_id: int
    topic: str
    sources: Sequence[Source] = ()
    """The batch's records: their partitions and offsets are read only when a log line needs them."""
    model_version: str = ""

    @classmethod
    def of(cls, batch_id: int, sources: Sequence[Source], model_version: str) -> BatchContext:
        """The context of a batch of source records."""
        return cls(batch_id, sources[0].topic if sources else "", sources, model_version)

    @cached_property
    def offset_range(self) -> dict[int, tuple[int, int]]:
        """partition -> (first offset, last offset) of the records in the batch."""
        lowest, highest = offset_bounds(self.sources)
        return {partition: (low, highest[(topic, partition)]) for (topic, partition), low in lowest.items()}

    @property
    def partitions(self) -> tuple[int, ...]:
        """The partitions the batch's records come from."""
        return tuple(sorted(self.offset_range))

    def fields(self) -> dict[str, object]:
        """Flat fields for a log line."""
        return {
            "batch_id": self.batch_id,
            "topic": self.topic,
            "partitions": list(self.partitions),
            "offsets": {str(p): f"{low}-{high}" for p, (low, high) in self.offset_range.items()},
            "model_version": self.model_version,
        }


current_batch: ContextVar[BatchContext | None] = ContextVar("streamserve_batch", default=None)
_batch_ids = itertools.count(1)


_worker_id: str | None = None


def set_worker(name: str) -> None:
    """Name this worker in every log line from now on, from every thread (one worker per process)."""
    global _worker_id
    _worker_id = name


def worker_id() -> str | None:
    """The worker's id, once set."""
    return _worker_id


def next_batch_id() -> int:
    """A process-wide increasing batch number."""
    return next(_batch_ids)


@contextmanager
def batch_scope(context: BatchContext) -> Iterator[BatchContext]:
    """Make ``context`` the current batch for the duration of the block."""
    token = current_batch.set(context)
    try:
        yield context
    finally:
        current_batch.reset(token)
