"""Avro encoding of predictions and the headers that travel with them."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import fastavro
import numpy as np

from streamserve.config import DEFAULT_PREDICTION_HEADERS, InputSettings, PredictionHeader
from streamserve.errors import ConfigError
from streamserve.pipeline.avrocolumns import ColumnWriter, MapRows
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.fields import epoch_ms, getter, millis_timestamp, render_id, text_getter
from streamserve.records import Event, Headers, ModelOutputs, Rejected, Source

HEADER_MODEL_NAME = "streamserve.model.name"
HEADER_MODEL_VERSION = "streamserve.model.version"
HEADER_SOURCE_TOPIC = "streamserve.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.source.offset"
HEADER_NAMES: dict[str, str] = {
    "model_name": HEADER_MODEL_NAME,
    "model_version": HEADER_MODEL_VERSION,
    "source_topic": HEADER_SOURCE_TOPIC,
    "source_partition": HEADER_SOURCE_PARTITION,
    "source_offset": HEADER_SOURCE_OFFSET,
}
"""The headers output.headers may select, by setting name, in the order a prediction carries them."""

ENCODE_STAGE = "encode"
_MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_OPTIONAL_FIELDS = ("predicted_class", "probabilities", "outputs")


class Encoded(NamedTuple):
    """One output record, with the input record it answers (a named tuple: one per record, see Source)."""

    source: Source
    key: bytes | None
    value: bytes
    headers: Headers


@dataclass(slots=True)
class EncodedBatch:
    """The output records of one lane of a batch as parallel lists (record i: sources[i], keys[i], values[i],
    headers[i]); records carrying the same headers share one list. Reads as a sequence of Encoded."""

    sources: list[Source] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    headers: list[Headers] = field(default_factory=list)
    columns: dict[str, Any] | None = None
    """The columns the values were written from (row i: record i), by output field name: a list or numpy array
    per record, a MapRows, or one value every record shares. None when some record was written alone or left
    out. Batch outputs build their own format from them (batch/output.py); nobody may change them."""

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[Encoded]:
        return map(Encoded, self.sources, self.keys, self.values, self.headers)

    def __getitem__(self, i: int) -> Encoded:
        return Encoded(self.sources[i], self.keys[i], self.values[i], self.headers[i])


class PredictionEncoder:
    """Turns a batch's model outputs into output records, one per event.

    Values are written by fastavro with the parsed schema into one reused buffer; everything that is
    the same for the whole batch (model, version, prediction time, header values) is computed once. A record
    that cannot be written (a copied field that does not fit the output schema) is rejected alone.

    Only the selected headers are written. Records that carry the same headers share one list (the batch's,
    or the source partition's); only ``source_offset`` makes a list per record. Nobody may change these lists.
    """

    def __init__(
        self,
        schema_path: Path,
        input_settings: InputSettings,
        copy_fields: dict[str, str] | None = None,
        value_prefix: bytes = b"",
        event_schema: Any | None = None,
        headers: Sequence[PredictionHeader] = DEFAULT_PREDICTION_HEADERS,
    ) -> None:
        """``event_schema`` (JSON form): a timestamp-millis key or id renders as before, as its datetime's
        isoformat, and one copied to a field of another type is written as that datetime. ``headers``: the
        headers predictions carry (output.headers)."""
        unknown = [name for name in headers if name not in HEADER_NAMES]
        if unknown:
            raise ConfigError(f"output.headers {unknown}: known headers are {list(HEADER_NAMES)}")
        self.headers = frozenset(headers)
        """The headers predictions carry (output.headers)."""
        self.schema = load_schema(schema_path)
        self.value_prefix = value_prefix
        """Written before each value: Schema Registry wire format's magic byte and schema id, or nothing."""
        schema_fields = cast("list[dict[str, Any]]", self.schema["fields"])  # type: ignore[call-overload,index]
        names = {field["name"] for field in schema_fields}
        missing = [name for name in copy_fields or {} if name not in names]
        if missing:
            raise ConfigError(f"output.copy_fields {missing}: the output schema {schema_path} has no such fields")
        self._optional = {name: name in names for name in _OPTIONAL_FIELDS}
        self._key = text_getter(input_settings.key_field, event_schema)
        self._id = text_getter(input_settings.event_id_field, event_schema)
        self._time = getter(input_settings.event_time_field) if input_settings.event_time_field else None
        self._copies = [
            # epoch ms into a field of the same logical type as it is; else the datetime it stands for
            (
                name,
                getter(path)
                if millis_timestamp(event_schema, path) == millis_timestamp(self.schema, name)
                else text_getter(path, event_schema),
            )
            for name, path in (copy_fields or {}).items()
        ]
        self._columns = ColumnWriter.for_schema(self.schema)
        """Writes a batch's values column-wise, byte-identical to fastavro; None for schemas it does not cover."""

    def key_of(self, event: Event) -> str | None:
        """The event's key as text (canary routing, output record key)."""
        return render_id(self._key(event.fields))

    def encode(
        self,
        events: Sequence[Event],
        outputs: ModelOutputs,
        model_name: str,
        model_version: str,
        degraded: bool = False,
    ) -> tuple[EncodedBatch, list[Rejected]]:
        """Encode one record per event (outputs are aligned with events); records that fail are rejected."""
        if not events:
            return EncodedBatch(), []
        shared: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "prediction_time": int(time.time() * 1000),
            "degraded": degraded,
        }
        # Per event, what only the event knows (ids, time, copied fields): for the whole batch at once, and
        # one event at a time when a value cannot be read, so that only that event is rejected.
        rejected: list[Rejected] = []
        sources = [event.source for event in events]
        try:
            kept, keys, per_event, copied = self._event_columns(events, sources)
        except Exception:  # noqa: BLE001 - one event's values: found below, event by event
            kept, keys, per_event, copied = self._event_columns_one_by_one(events, rejected)
        if len(kept) != len(events):
            sources = [sources[i] for i in kept]
        columns = {**shared, **per_event, **copied, "key": keys, **self.output_columns(outputs, len(events), kept)}
        values = self._write(columns, len(kept), sources, rejected)
        if None in values:  # records the writer refused (rejected above): left out
            written = [i for i, value in enumerate(values) if value is not None]
            sources, keys, values = (
                [sources[i] for i in written],
                [keys[i] for i in written],
                [values[i] for i in written],
            )
        out = EncodedBatch(
            sources,
            [None if key is None else key.encode() for key in keys],
            cast("list[bytes]", values),
            columns=columns if len(values) == len(kept) else None,
        )
        out.headers = self.record_headers(sources, model_name, model_version)
        return out, rejected

    def output_columns(self, outputs: ModelOutputs, n: int, kept: list[int]) -> dict[str, Any]:
        """The model's outputs for n events as the columns of the kept rows: score, label, predicted_class,
        probabilities and outputs (the last two only when the output schema has them)."""
        labels = outputs.label.tolist() if outputs.label is not None else [None] * n
        texts: list[Any] = [None] * n
        if outputs.label_text is not None:
            texts = outputs.label_text.tolist()
        elif outputs.label is not None:
            texts = [str(label) for label in labels]
        probabilities: list[Any] | MapRows = [None] * n
        if outputs.probabilities is not None and self._optional["probabilities"]:
            classes = outputs.classes or tuple(str(i) for i in range(outputs.probabilities.shape[1]))
            probabilities = MapRows(tuple(classes), outputs.probabilities)  # no dict per row
        extras: list[Any] = [None] * n
        if outputs.extra and self._optional["outputs"]:
            named = {name: values.tolist() for name, values in outputs.extra.items()}
            extras = [{name: values[i] for name, values in named.items()} for i in range(n)]
        if len(kept) == n:
            return {
                "score": outputs.score,
                "label": labels,
                "predicted_class": texts,
                "probabilities": probabilities,
                "outputs": extras,
            }
        return {
            "score": outputs.score[np.array(kept, dtype=np.intp)],
            "label": [labels[i] for i in kept],
            "predicted_class": [texts[i] for i in kept],
            "probabilities": _take(probabilities, kept),
            "outputs": [extras[i] for i in kept],
        }

    def record_headers(self, sources: list[Source], model_name: str, model_version: str) -> list[Headers]:
        """The headers of each record (output.headers): the batch's, then its source partition's and offset when
        selected. Records carrying the same headers share one list."""
        wanted = self.headers
        batch_headers: Headers = []
        if "model_name" in wanted:
            batch_headers.append((HEADER_MODEL_NAME, model_name.encode()))
        if "model_version" in wanted:
            batch_headers.append((HEADER_MODEL_VERSION, model_version.encode()))
        with_topic, with_partition = "source_topic" in wanted, "source_partition" in wanted
        per_partition, per_record = with_topic or with_partition, "source_offset" in wanted
        if not per_partition and not per_record:  # the default: every record carries the batch's headers
            return [batch_headers] * len(sources)
        headers: list[Headers] = []
        partition_headers: dict[tuple[str, int], Headers] = {}
        for source in sources:
            found: Headers = batch_headers
            if per_partition:
                tp = (source.topic, source.partition)
                if tp not in partition_headers:
                    partition_headers[tp] = [
                        *batch_headers,
                        *([(HEADER_SOURCE_TOPIC, source.topic.encode())] if with_topic else []),
                        *([(HEADER_SOURCE_PARTITION, str(source.partition).encode())] if with_partition else []),
                    ]
                found = partition_headers[tp]
            if per_record:
                found = [*found, (HEADER_SOURCE_OFFSET, str(source.offset).encode())]
            headers.append(found)
        return headers

    def _event_columns(
        self, events: Sequence[Event], sources: list[Source]
    ) -> tuple[list[int], list[str | None], dict[str, list[Any]], dict[str, list[Any]]]:
        """Ids, keys, times, origins and copied fields of every event (sources: the events' sources), a column
        at a time; raises when one event's value cannot be read (the caller then goes event by event)."""
        everything = [event.fields for event in events]
        topics, partitions, offsets, _, _, _, timestamps = zip(*sources, strict=True)
        key_of, id_of, time_of = self._key, self._id, self._time
        keys = _rendered([key_of(fields) for fields in everything])
        ids = _rendered([id_of(fields) for fields in everything])
        if time_of is None:
            times = list(timestamps)
        else:
            times = [time_of(fields) for fields in everything]
            if not _all_of(times, int):  # epoch ms already when read from timestamp-millis
                times = [epoch_ms(value) for value in times]
        present = times if None not in times else [value for value in times if value is not None]
        if present and not (min(present) >= _MIN_TIME_MS and max(present) <= _MAX_TIME_MS):
            raise ValueError("an event time is outside years 1-9999")
        per_event = {
            "event_id": ids,
            "event_time": times,
            "source_topic": list(topics),
            "source_partition": list(partitions),
            "source_offset": list(offsets),
        }
        copied = {name: [get(fields) for fields in everything] for name, get in self._copies}
        return list(range(len(events))), keys, per_event, copied

    def _event_columns_one_by_one(
        self, events: Sequence[Event], rejected: list[Rejected]
    ) -> tuple[list[int], list[str | None], dict[str, list[Any]], dict[str, list[Any]]]:
        """_event_columns() event by event: an event whose values cannot be read is rejected alone."""
        key_of, id_of, time_of, copies = self._key, self._id, self._time, self._copies
        kept: list[int] = []
        keys: list[str | None] = []
        per_event: dict[str, list[Any]] = {
            name: [] for name in ("event_id", "event_time", "source_topic", "source_partition", "source_offset")
        }
        copied: dict[str, list[Any]] = {name: [] for name, _ in copies}
        for i, event in enumerate(events):
            source, fields = event.source, event.fields
            try:
                key = render_id(key_of(fields))
                event_id = render_id(id_of(fields))
                event_time = epoch_ms(time_of(fields)) if time_of else source.timestamp_ms
                if event_time is not None and not _MIN_TIME_MS <= event_time <= _MAX_TIME_MS:
                    raise ValueError(f"event time {event_time} ms is outside years 1-9999: readers cannot decode it")
                values = [get(fields) for _, get in copies]
            except Exception as exc:  # noqa: BLE001 - whatever one record's values do, only that record fails
                rejected.append(Rejected.from_error(source, ENCODE_STAGE, exc))
                continue
            kept.append(i)
            keys.append(key)
            per_event["event_id"].append(event_id)
            per_event["event_time"].append(event_time)
            per_event["source_topic"].append(source.topic)
            per_event["source_partition"].append(source.partition)
            per_event["source_offset"].append(source.offset)
            for (name, _), value in zip(copies, values, strict=True):
                copied[name].append(value)
        return kept, keys, per_event, copied

    def _write(
        self, columns: dict[str, Any], n: int, sources: list[Source], rejected: list[Rejected]
    ) -> list[bytes | None]:
        """Each row's value: by the column writer when the schema allows (its row path for small batches), else
        (or for a batch with a value it refuses) record by record with fastavro, where a record that fails is
        rejected alone."""
        prefix = self.value_prefix
        if self._columns is not None:
            try:
                return (
                    [prefix + value for value in self._columns.write(columns, n)]
                    if prefix
                    else [*self._columns.write(columns, n)]
                )
            except (TypeError, ValueError, OverflowError):
                pass  # find the failing records one by one below
        write, schema, buffer = fastavro.schemaless_writer, self.schema, io.BytesIO()
        columns = {name: value.rows() if isinstance(value, MapRows) else value for name, value in columns.items()}
        shared = {name: value for name, value in columns.items() if not isinstance(value, (list, np.ndarray))}
        per_row = {name: value for name, value in columns.items() if isinstance(value, (list, np.ndarray))}
        as_lists = {name: value.tolist() if isinstance(value, np.ndarray) else value for name, value in per_row.items()}
        values: list[bytes | None] = []
        record = dict(shared)
        for row in range(n):
            try:
                for name, column in as_lists.items():
                    record[name] = column[row]
                buffer.seek(0)
                buffer.truncate()
                buffer.write(prefix)
                write(buffer, schema, record)
            except Exception as exc:  # noqa: BLE001 - whatever one record's values do, only that record fails
                rejected.append(Rejected.from_error(sources[row], ENCODE_STAGE, exc))
                values.append(None)
                continue
            values.append(buffer.getvalue())
        return values


def _take(column: list[Any] | MapRows, rows: list[int]) -> list[Any] | MapRows:
    """The given rows of a column."""
    return column.take(rows) if isinstance(column, MapRows) else [column[i] for i in rows]


def _all_of(values: list[Any], kind: type) -> bool:
    """Every value is exactly of this type (not a subclass: bool is no int here)."""
    return set(map(type, values)) <= {kind}


def _rendered(values: list[Any]) -> list[str | None]:
    """render_id() of each value; text and nulls as they are."""
    return values if set(map(type, values)) <= {str, type(None)} else [render_id(value) for value in values]


def decode_prediction(schema: fastavro.types.Schema, value: bytes) -> dict[str, object]:
    """Read one prediction record (for tools and tests)."""
    record = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    assert isinstance(record, dict)
    return record
