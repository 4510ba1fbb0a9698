"""`streamserve monitor export --to FILE.parquet`: the training-set topic as one Parquet file.

One row per event id (the latest record of a key: the topic is compacted, and a restarted join writes the same
examples again). Columns: event_id, event_time, model_name, model_version, score, predicted_label, label,
label_time, logged_at, then one per feature with the value the model was fed (number, string, or a list for a
vector or one-hot feature): the form ``models publish --reference`` reads, so an export is a reference sample.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fastavro

from streamserve.config import PipelineSettings
from streamserve.control.reading import read_keyed_records
from streamserve.errors import ConfigError
from streamserve.schemas import bundled

META_COLUMNS = (
    "event_id",
    "event_time",
    "model_name",
    "model_version",
    "score",
    "predicted_label",
    "label",
    "label_time",
    "logged_at",
)


def training_rows(settings: PipelineSettings, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """The training-set topic's examples, one per event id (the latest), as flat rows."""
    schema = bundled("training_example")
    latest: dict[bytes | None, bytes] = {}
    records = read_keyed_records(settings.kafka.common(), settings.monitor.training_set_topic, timeout_s)
    for key, value in records:
        if value:
            latest[key] = value
    rows = []
    for value in latest.values():
        example = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
        assert isinstance(example, dict)
        features = example.pop("features")
        clash = sorted(set(features) & set(META_COLUMNS))
        if clash:
            raise ConfigError(f"features {clash} have the names of export columns: rename them to export")
        rows.append({name: example.get(name) for name in META_COLUMNS} | features)
    return rows


def _uniform(rows: list[dict[str, Any]], column: str) -> None:
    """A column of mixed label types (ints and strings) as strings, so it has one Parquet type."""
    kinds = {type(row[column]) for row in rows if row.get(column) is not None}
    if len(kinds) > 1 and not kinds <= {int, float}:
        for row in rows:
            if row.get(column) is not None:
                row[column] = str(row[column])


def export_parquet(settings: PipelineSettings, path: Path, timeout_s: float = 60.0) -> int:
    """Write the training set to a Parquet file; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = training_rows(settings, timeout_s)
    for column in ("predicted_label", "label"):
        _uniform(rows, column)
    table = pa.Table.from_pylist(rows) if rows else pa.table({name: [] for name in META_COLUMNS})
    try:
        pq.write_table(table, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc}") from exc
    return table.num_rows
