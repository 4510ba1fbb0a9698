"""score_files(): a batch job from input files to a predictions file and a rejects file, with progress."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

from streamserve.batch.files import InputFile, input_paths, open_input
from streamserve.batch.output import PredictionWriter, RejectsWriter, output_kind, prediction_writer
from streamserve.batch.rows import Origin, RowReader
from streamserve.batch.scoring import score_batches
from streamserve.clients import redis_client
from streamserve.config import PipelineSettings
from streamserve.errors import BatchInputError
from streamserve.observe.progress import Progress
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.process import BatchResult
from streamserve.scoring import Scorer, carried_features, feature_sources, load_model, output_schema

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 4096
"""Rows per record batch: big enough that per-batch work (a Redis round trip, an ORT call) is spread thin."""


@dataclass
class Summary:
    """What a job did: counts, time, where each feature came from, rejects by stage and reason."""

    files: int = 0
    rows: int = 0
    predictions: int = 0
    seconds: float = 0.0
    """The whole job, from loading the model to the last file written."""
    load_seconds: float = 0.0
    """Loading and warming up the model (once per job, before the first row)."""
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)
    features: dict[str, str] = field(default_factory=dict)
    output: str = ""
    rejects: str | None = None

    @property
    def rows_per_s(self) -> float:
        """Rows scored per second, from the first row read to the last written (the model's load left out)."""
        scoring = self.seconds - self.load_seconds
        return self.rows / scoring if scoring > 0 else 0.0

    def text(self) -> str:
        """The summary a user reads at the end of the job."""
        lines = [
            f"scored {self.rows:,} rows of {self.files} file(s) in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s"
            f" after {self.load_seconds:.1f}s loading the model): {self.predictions:,} predictions -> {self.output},"
            f" {sum(self.rejected.values()):,} rejected" + (f" -> {self.rejects}" if self.rejects else ""),
        ]
        by_source: dict[str, list[str]] = {}
        for name, source in self.features.items():
            by_source.setdefault(source, []).append(name)
        lines += [f"features from {source}: {', '.join(names)}" for source, names in by_source.items()]
        for (stage, reason), count in self.rejected.most_common(10):
            lines.append(f"rejected at {stage}: {count:,} x {reason}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        """The summary as a JSON object (rejects by stage)."""
        stages: Counter[str] = Counter()
        for (stage, _), count in self.rejected.items():
            stages[stage] += count
        return {
            "files": self.files,
            "rows": self.rows,
            "predictions": self.predictions,
            "seconds": self.seconds,
            "load_seconds": self.load_seconds,
            "rows_per_s": self.rows_per_s,
            "rejected": dict(stages),
            "features": self.features,
        }


def rejects_path(output: Path) -> Path:
    """The default rejects file beside the output: ``preds.parquet`` -> ``preds.rejects.parquet``."""
    return output.with_name(f"{output.stem}.rejects{output.suffix}")


def score_files(
    settings: PipelineSettings,
    input_pattern: str,
    output: Path,
    rejects: Path | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress_stream: IO[str] | None = None,
) -> Summary:
    """Score every row of the input files with the pipeline's model, as its worker would; BatchInputError (one
    line) for an input that cannot be read as the pipeline's events."""
    output_kind(output)
    files = [open_input(path) for path in input_paths(input_pattern)]
    rejects = rejects or rejects_path(output)
    output_kind(rejects)
    carried = {file.path: carried_features(settings, file.schema.names) for file in files}
    event_schema = json.loads(settings.input.schema_path.read_text())
    for file in files:  # every file's columns, before the model is loaded: a bad file costs nothing
        RowReader(event_schema, carried[file.path]).check(file.schema, file.path)
    started = time.perf_counter()
    model = load_model(settings)
    summary = Summary(files=len(files), output=str(output), load_seconds=time.perf_counter() - started)
    scorers: dict[tuple[str, ...], tuple[Scorer, RowReader]] = {}
    total = None if any(f.rows is None for f in files) else sum(f.rows or 0 for f in files)
    progress = Progress(total, progress_stream)
    writer = prediction_writer(output, output_schema(settings))
    rejected = RejectsWriter(rejects)
    carried_all: set[str] = set()
    redis = redis_client(settings.redis) if any(spec.source == "redis" for spec in settings.features) else None
    decoder = LocalSchemaDecoder(load_schema(settings.input.schema_path))  # unused: rows arrive decoded
    # As the worker before its loop: what was built so far (model, clients, schemas) lives as long as the job, out
    # of the cyclic collector's sight, so that its full collections stop walking it.
    gc.collect()
    gc.freeze()
    try:
        for index, file in enumerate(files):
            carried_all.update(carried[file.path])
            found = scorers.get(carried[file.path])
            if found is None:
                scorer = Scorer.for_settings(settings, model, carried=carried[file.path], redis=redis, decoder=decoder)
                found = scorers[carried[file.path]] = (scorer, RowReader(event_schema, carried[file.path]))
            _score_file(file, index, *found, batch_rows, writer, rejected, summary, progress)
    finally:
        progress.close()
        writer.close()
        rejected.close()
    summary.seconds = time.perf_counter() - started
    summary.features = feature_sources(settings, carried_all)
    summary.rejects = str(rejects) if rejected.count else None
    return summary


def _score_file(
    file: InputFile,
    index: int,
    scorer: Scorer,
    rows: RowReader,
    batch_rows: int,
    writer: PredictionWriter,
    rejects: RejectsWriter,
    summary: Summary,
    progress: Progress,
) -> None:
    """One file's batches through the scorer, their outputs to the writers."""
    read = 0
    for scored in score_batches(scorer, rows, _with_origins(file, index, batch_rows)):
        batch, result = scored.batch, scored.result
        for _, encoded in result.outputs:
            writer.write(encoded)
        rejects.write(result.rejected, _rejected_rows(batch, result, scored.origin.first_row))
        summary.rows += batch.num_rows
        summary.predictions += result.predictions
        summary.rejected.update((r.stage, _reason_kind(r.message)) for r in result.rejected)
        progress.advance(batch.num_rows)
        read += batch.num_rows
    if file.rows is not None and read != file.rows:
        raise BatchInputError(file.path, f"read {read} rows where the footer says {file.rows}")


def _with_origins(file: InputFile, index: int, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, Origin]]:
    """The file's record batches, each with where its rows come from (the file's mtime as their timestamp)."""
    first = 0
    stamp = int(file.path.stat().st_mtime * 1000)
    for batch in file.batches(batch_rows):
        yield batch, Origin(str(file.path), index, first, stamp)
        first += batch.num_rows


def _rejected_rows(batch: pa.RecordBatch, result: BatchResult, first: int) -> dict[int, str | None]:
    """Each rejected row's input as JSON, by its offset (row number in the file)."""
    if not result.rejected:
        return {}
    offsets = sorted({r.source.offset for r in result.rejected})
    rows = batch.take(pa.array([offset - first for offset in offsets])).to_pylist()
    return {offset: json.dumps(row, default=str) for offset, row in zip(offsets, rows, strict=True)}


def _reason_kind(message: str) -> str:
    """A reason without what is particular to one row (digits), so that rejects of one kind count together."""
    return "".join("N" if ch.isdigit() else ch for ch in message)[:160]
