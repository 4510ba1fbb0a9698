"""Record batches of input rows through the one Scorer (streamserve/scoring.py): rows -> events -> the worker's
BatchProcessor, with the next batch's Redis lookup sent ahead while this one is scored, as the worker does."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from streamserve.batch.rows import Origin, RowReader
from streamserve.pipeline.process import BatchResult
from streamserve.records import Event, Rejected
from streamserve.scoring import Scorer


@dataclass(frozen=True, slots=True)
class Scored:
    """One record batch of input rows and what the processor made of it."""

    batch: pa.RecordBatch
    origin: Origin
    result: BatchResult


def score_batches(
    scorer: Scorer, rows: RowReader, batches: Iterable[tuple[pa.RecordBatch, Origin]]
) -> Iterator[Scored]:
    """Each batch's rows read as events and scored, in order; a batch's Redis lookup goes out before the batch
    ahead of it is scored, so Redis works through its keys meanwhile (one batch read ahead)."""
    waiting: tuple[pa.RecordBatch, Origin, list[Event], list[Rejected]] | None = None
    for batch, origin in batches:
        events, rejected = rows.events(batch, origin)
        scorer.prefetch_events(events)
        if waiting is not None:
            yield _score(scorer, *waiting)
        waiting = (batch, origin, events, rejected)
    if waiting is not None:
        yield _score(scorer, *waiting)


def _score(
    scorer: Scorer, batch: pa.RecordBatch, origin: Origin, events: list[Event], rejected: list[Rejected]
) -> Scored:
    return Scored(batch, origin, scorer.run_events(events, rejected))
