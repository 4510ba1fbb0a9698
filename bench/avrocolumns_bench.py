"""Microbenchmark: microseconds per prediction record, fastavro per record vs ColumnWriter per batch (its row path
below avrocolumns.ROWS_BELOW rows, its column path from there).

Run with `python -m bench.avrocolumns_bench [batch sizes...]`. Both sides start from the same columns
(numpy outputs, per-event lists, shared scalars); the fastavro side includes building its record dicts the way
PredictionEncoder does, and checks that both produce the same bytes before timing.
"""

from __future__ import annotations

import io
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np

from streamserve.pipeline.avrocolumns import ColumnWriter, MapRows
from streamserve.pipeline.decode import load_schema

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "prediction.avsc"
REPEATS = 9


def prediction_columns(n: int, seed: int = 7) -> dict[str, Any]:
    """One batch of a binary classifier's predictions with probabilities, about 10% of events lacking a time."""
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    labels = (scores > 0.5).astype(np.int64)
    event_times = (1_700_000_000_000 + rng.integers(0, 10**9, n)).tolist()
    for i in np.flatnonzero(rng.random(n) < 0.1).tolist():
        event_times[i] = None
    return {
        "event_id": [str(uuid.UUID(int=int(rng.integers(0, 2**62)))) for _ in range(n)],
        "key": [f"card-{k}" for k in rng.integers(0, 100_000, n).tolist()],
        "model_name": "fraud",
        "model_version": "v12",
        "score": scores,
        "label": labels,
        "event_time": event_times,
        "prediction_time": 1_700_000_123_456,
        "source_topic": "card-transactions",
        "source_partition": rng.integers(0, 12, n),
        "source_offset": 5_000_000 + np.arange(n, dtype=np.int64),
        "degraded": False,
        "predicted_class": [str(label) for label in labels.tolist()],
        "probabilities": MapRows(("0", "1"), np.column_stack([1.0 - scores, scores])),  # as PredictionEncoder gives it
        "outputs": None,
    }


def with_fastavro(schema: Any, columns: dict[str, Any], n: int) -> list[bytes]:
    """PredictionEncoder without the column writer: one dict per event, one schemaless_writer call per record."""
    per_row = {name: value.rows() if isinstance(value, MapRows) else value for name, value in columns.items()}
    per_row = {name: (value.tolist() if isinstance(value, np.ndarray) else value) for name, value in per_row.items()}
    shared = {name: value for name, value in per_row.items() if not isinstance(value, list)}
    varying = [(name, value) for name, value in per_row.items() if isinstance(value, list)]
    write, buffer, record, out = fastavro.schemaless_writer, io.BytesIO(), dict(shared), []
    for i in range(n):
        for name, value in varying:
            record[name] = value[i]
        buffer.seek(0)
        buffer.truncate()
        write(buffer, schema, record)
        out.append(buffer.getvalue())
    return out


def best_us_per_record(runs: list[Callable[[], list[bytes]]], n: int) -> list[float]:
    """The fastest of REPEATS rounds for each run, in microseconds per record; rounds interleave the runs so
    that a shared machine's load weighs on both alike."""
    best = [float("inf")] * len(runs)
    for _ in range(REPEATS):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return [seconds / n * 1e6 for seconds in best]


def main(sizes: list[int]) -> None:
    """Print us/record for both writers at each batch size."""
    schema = load_schema(SCHEMA_PATH)
    writer = ColumnWriter.for_schema(schema)
    assert writer is not None
    print(f"{'rows':>6} {'fastavro us/rec':>16} {'columns us/rec':>15} {'speed-up':>9}")
    for n in sizes:
        columns = prediction_columns(n)
        assert writer.write(columns, n) == with_fastavro(schema, columns, n), "the writers disagree"
        slow, fast = best_us_per_record(
            [lambda: with_fastavro(schema, columns, n), lambda: writer.write(columns, n)],  # noqa: B023 - used at once
            n,
        )
        print(f"{n:>6} {slow:>16.2f} {fast:>15.2f} {slow / fast:>8.1f}x")


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [256, 1024, 4096])
