"""The outputs of a batch job: predictions (Parquet, or an Avro container holding the very records the worker
produces) and rejects (one row per rejected input: file, row, stage, error class, reason, the row as JSON).

Parquet predictions are built from the columns the encoder wrote its records from (``EncodedBatch.columns``),
column by column, never from per-row objects; a batch whose columns are not at hand (a record the encoder wrote
alone) is read back from its Avro records instead. Both give the same rows.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Protocol

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamserve.batch.arrowtypes import arrow_schema
from streamserve.errors import ConfigError
from streamserve.pipeline.avrocolumns import MapRows
from streamserve.pipeline.decode import LocalSchemaDecoder
from streamserve.pipeline.encode import EncodedBatch
from streamserve.records import Rejected

REJECT_FIELDS = ("source_file", "source_row", "stage", "error_class", "reason", "row")
REJECTS_AVRO = {
    "type": "record",
    "name": "Reject",
    "namespace": "io.streamserve.batch",
    "doc": "One input row a batch job could not predict, with the stage and the reason.",
    "fields": [
        {"name": "source_file", "type": "string"},
        {"name": "source_row", "type": "long"},
        {"name": "stage", "type": "string"},
        {"name": "error_class", "type": "string"},
        {"name": "reason", "type": "string"},
        {"name": "row", "type": ["null", "string"], "doc": "The input row as JSON (null when it was not read)."},
    ],
}
_SYNC_SIZE = 16


def output_kind(path: Path) -> str:
    """parquet or avro, by the output file's suffix."""
    kind = {".parquet": "parquet", ".pq": "parquet", ".avro": "avro"}.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"--output {path}: name a .parquet or .avro file")
    return kind


class PredictionWriter(Protocol):
    """Writes prediction records (the encoder's, of the output schema) to a file."""

    def write(self, encoded: EncodedBatch) -> None: ...

    def close(self) -> None: ...


class ParquetPredictions:
    """Predictions as Parquet: columns of the output schema (times as UTC timestamps)."""

    def __init__(self, path: Path, schema: Any) -> None:
        self._decoder = LocalSchemaDecoder(fastavro.parse_schema(schema))
        self.schema = arrow_schema(schema, millis=pa.timestamp("ms", tz="UTC"))
        self._writer = pq.ParquetWriter(path, self.schema)
        self.from_columns = 0
        """Batches built from the encoder's columns (the others were read back from their records)."""

    def write(self, encoded: EncodedBatch) -> None:
        """Append a lane's records: from the columns they were written from, else read back from their bytes."""
        if not len(encoded):
            return
        batch = prediction_batch(encoded.columns, len(encoded), self.schema) if encoded.columns is not None else None
        if batch is None:
            rows = self._decoder.decode_many(encoded.values)  # bytes the encoder wrote: they always read back
            batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        else:
            self.from_columns += 1
        self._writer.write_batch(batch)

    def close(self) -> None:
        """Write the footer."""
        self._writer.close()


class AvroPredictions:
    """Predictions as an Avro container file: the encoder's bytes as they are, one deflated block per batch."""

    def __init__(self, path: Path, schema: Any) -> None:
        self._file = path.open("wb")
        self._sync = os.urandom(_SYNC_SIZE)
        meta = {"avro.schema": json.dumps(schema).encode(), "avro.codec": b"deflate"}
        self._file.write(b"Obj\x01")
        fastavro.schemaless_writer(self._file, {"type": "map", "values": "bytes"}, meta)
        self._file.write(self._sync)

    def write(self, encoded: EncodedBatch) -> None:
        """Append the records as one block."""
        values = encoded.values
        if not values:
            return
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate, as the Avro spec's codec has it
        data = compressor.compress(b"".join(values)) + compressor.flush()
        fastavro.schemaless_writer(self._file, "long", len(values))
        fastavro.schemaless_writer(self._file, "long", len(data))
        self._file.write(data)
        self._file.write(self._sync)

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def prediction_batch(columns: dict[str, Any], n: int, schema: pa.Schema) -> pa.RecordBatch | None:
    """The encoder's columns of n records as a record batch of the output schema; None when a field has no column
    (the writer's default) or a column has a form not built here: the caller reads the records back instead."""
    try:
        return pa.RecordBatch.from_arrays([_array(columns[f.name], n, f.type) for f in schema], schema=schema)
    except (KeyError, pa.ArrowException, TypeError, ValueError, OverflowError):
        return None


def _array(column: Any, n: int, kind: pa.DataType) -> pa.Array:
    """One output column: a value the whole batch shares, a list or numpy array per row, or a MapRows."""
    if isinstance(column, MapRows):
        return _map_rows(column, kind)
    if not isinstance(column, (list, np.ndarray)):
        column = [column] * n
    if len(column) != n:
        raise ValueError(f"a column of {len(column)} values for {n} records")
    if pa.types.is_timestamp(kind):  # epoch milliseconds, as the encoder holds them
        return pa.array(column, pa.int64()).cast(kind)
    if pa.types.is_map(kind):  # a dict per row (further outputs): Arrow builds maps from (key, value) pairs
        column = [None if row is None else list(row.items()) for row in column]
    return pa.array(column, kind)


def _map_rows(column: MapRows, kind: pa.DataType) -> pa.Array:
    """A map column whose rows share their keys: offsets, repeated keys and the values' flat array."""
    rows, width = column.values.shape
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32))
    keys = pa.array(list(column.keys) * rows, pa.string())
    items = pa.array(np.ascontiguousarray(column.values).reshape(-1), kind.item_type)
    return pa.MapArray.from_arrays(offsets, keys, items, type=kind)


def prediction_writer(path: Path, schema: Any) -> PredictionWriter:
    """The writer of an output file, by its suffix."""
    return ParquetPredictions(path, schema) if output_kind(path) == "parquet" else AvroPredictions(path, schema)


class RejectsWriter:
    """Rejected rows, in the output's format; the file is created with the first reject (none: no file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kind = output_kind(path)
        self.count = 0
        self._parquet: pq.ParquetWriter | None = None
        self.schema = arrow_schema(REJECTS_AVRO)
        self._avro_schema = fastavro.parse_schema(REJECTS_AVRO)
        path.unlink(missing_ok=True)

    def write(self, rejected: list[Rejected], rows: dict[int, str | None]) -> None:
        """Append rejects; ``rows``: each rejected offset's input row as JSON."""
        if not rejected:
            return
        records = [
            {
                "source_file": r.source.topic,
                "source_row": r.source.offset,
                "stage": r.stage,
                "error_class": r.error_class,
                "reason": r.message,
                "row": rows.get(r.source.offset),
            }
            for r in rejected
        ]
        self.count += len(records)
        if self.kind == "parquet":
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.path, self.schema)
            self._parquet.write_batch(pa.RecordBatch.from_pylist(records, schema=self.schema))
            return
        with self.path.open("a+b") as handle:  # fastavro appends blocks to a container opened a+b
            fastavro.writer(handle, self._avro_schema, records)

    def close(self) -> None:
        """Finish the file (if any reject was written)."""
        if self._parquet is not None:
            self._parquet.close()
