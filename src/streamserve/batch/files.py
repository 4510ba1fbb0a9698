"""The input files of a batch job: a file, a directory or a glob of Parquet and Avro container files, each read as
Arrow record batches (Parquet with pyarrow, Avro containers with fastavro); a file that cannot be read is one line
naming it."""

from __future__ import annotations

import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq

from streamserve.batch.arrowtypes import Unsupported, arrow_schema
from streamserve.errors import BatchInputError

SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".avro": "avro"}


def input_paths(pattern: str) -> list[Path]:
    """The files a --input names: the file, the Parquet/Avro files of a directory, or a glob's matches, sorted."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not found:
        raise BatchInputError(pattern, "no Parquet (.parquet) or Avro (.avro) file found")
    return found


@dataclass
class InputFile:
    """One input file: its Arrow schema, its row count when the file says it, and its record batches."""

    path: Path
    kind: str
    schema: pa.Schema
    rows: int | None

    def batches(self, size: int) -> Iterator[pa.RecordBatch]:
        """The file's rows, ``size`` at a time; BatchInputError when a part of the file is unreadable."""
        read = _parquet_batches if self.kind == "parquet" else _avro_batches
        try:
            yield from read(self, size)
        except (OSError, pa.ArrowException, ValueError, EOFError, TypeError) as exc:
            raise BatchInputError(self.path, f"unreadable {self.kind} data: {_first_line(exc)}") from exc


def open_input(path: Path) -> InputFile:
    """The file's schema and size (a Parquet footer, an Avro header), or BatchInputError naming the file."""
    kind = SUFFIXES.get(path.suffix.lower()) or _sniff(path)
    try:
        if kind == "parquet":
            meta = pq.ParquetFile(path)
            return InputFile(path, kind, meta.schema_arrow, meta.metadata.num_rows)
        with path.open("rb") as handle:
            reader = fastavro.reader(handle)
            return InputFile(path, kind, _avro_arrow_schema(path, reader.writer_schema), None)
    except BatchInputError:
        raise
    except (OSError, pa.ArrowException, ValueError, EOFError) as exc:
        raise BatchInputError(
            path, f"not a readable {kind} file (corrupt footer or header?): {_first_line(exc)}"
        ) from exc


def _sniff(path: Path) -> str:
    """parquet or avro by the file's magic bytes (a name without a known suffix)."""
    with path.open("rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return "parquet"
    if head == b"Obj\x01":
        return "avro"
    raise BatchInputError(path, "neither a Parquet nor an Avro container file (use .parquet or .avro)")


def _avro_arrow_schema(path: Path, writer_schema: Any) -> pa.Schema:
    try:
        return arrow_schema(writer_schema, millis=pa.timestamp("ms", tz="UTC"))
    except (Unsupported, KeyError) as exc:
        raise BatchInputError(path, f"its Avro schema has no column form: {exc}") from exc


def _parquet_batches(file: InputFile, size: int) -> Iterator[pa.RecordBatch]:
    yield from pq.ParquetFile(file.path).iter_batches(batch_size=size)


def _avro_batches(file: InputFile, size: int) -> Iterator[pa.RecordBatch]:
    with file.path.open("rb") as handle:
        chunk: list[dict[str, Any]] = []
        for record in fastavro.reader(handle):
            chunk.append(record)  # type: ignore[arg-type]  # a record schema's items are dicts
            if len(chunk) == size:
                yield pa.RecordBatch.from_pylist(chunk, schema=file.schema)
                chunk = []
        if chunk:
            yield pa.RecordBatch.from_pylist(chunk, schema=file.schema)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
