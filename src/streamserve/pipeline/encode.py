"""Avro encoding of predictions and the headers that travel with them."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import fastavro

from streamserve.config import InputSettings
from streamserve.errors import ConfigError
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.fields import epoch_ms, getter, render_id
from streamserve.records import Event, Headers, ModelOutputs, Rejected, Source

HEADER_MODEL_NAME = "streamserve.model.name"
HEADER_MODEL_VERSION = "streamserve.model.version"
HEADER_SOURCE_TOPIC = "streamserve.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.source.offset"

ENCODE_STAGE = "encode"
_MIN_TIME_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_OPTIONAL_FIELDS = ("predicted_class", "probabilities", "outputs")


@dataclass(frozen=True, slots=True)
class Encoded:
    """One output record, with the input record it answers."""

    source: Source
    key: bytes | None
    value: bytes
    headers: Headers


class PredictionEncoder:
    """Turns a batch's model outputs into output records, one per event.

    Values are written by fastavro with the parsed schema into one reused buffer; everything that is
    the same for the whole batch (model, version, prediction time, header values) is computed once. A record
    that cannot be written (a copied field that does not fit the output schema) is rejected alone.
    """

    def __init__(
        self,
        schema_path: Path,
        input_settings: InputSettings,
        copy_fields: dict[str, str] | None = None,
        value_prefix: bytes = b"",
    ) -> None:
        self.schema = load_schema(schema_path)
        self.value_prefix = value_prefix
        """Written before each value: Schema Registry wire format's magic byte and schema id, or nothing."""
        schema_fields = cast("list[dict[str, Any]]", self.schema["fields"])  # type: ignore[call-overload,index]
        names = {field["name"] for field in schema_fields}
        missing = [name for name in copy_fields or {} if name not in names]
        if missing:
            raise ConfigError(f"output.copy_fields {missing}: the output schema {schema_path} has no such fields")
        self._optional = {name: name in names for name in _OPTIONAL_FIELDS}
        self._key = getter(input_settings.key_field)
        self._id = getter(input_settings.event_id_field)
        self._time = getter(input_settings.event_time_field) if input_settings.event_time_field else None
        self._copies = [(name, getter(path)) for name, path in (copy_fields or {}).items()]

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
    ) -> tuple[list[Encoded], list[Rejected]]:
        """Encode one record per event (outputs are aligned with events); records that fail are rejected."""
        if not events:
            return [], []
        scores = outputs.score.tolist()
        n = len(events)
        labels = outputs.label.tolist() if outputs.label is not None else [None] * n
        texts: list[Any] = [None] * n
        if outputs.label_text is not None:
            texts = outputs.label_text.tolist()
        elif outputs.label is not None:
            texts = [str(label) for label in labels]
        probabilities: list[Any] = [None] * n
        if outputs.probabilities is not None and self._optional["probabilities"]:
            classes = outputs.classes or tuple(str(i) for i in range(outputs.probabilities.shape[1]))
            probabilities = [dict(zip(classes, row, strict=True)) for row in outputs.probabilities.tolist()]
        extras: list[Any] = [None] * n
        if outputs.extra and self._optional["outputs"]:
            named = {name: values.tolist() for name, values in outputs.extra.items()}
            extras = [{name: values[i] for name, values in named.items()} for i in range(n)]
        record: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "prediction_time": int(time.time() * 1000),
            "degraded": degraded,
        }
        name_header, version_header = model_name.encode(), model_version.encode()
        common: dict[tuple[str, int], Headers] = {}  # every header but the offset, per source partition
        write, schema, buffer, prefix = fastavro.schemaless_writer, self.schema, io.BytesIO(), self.value_prefix
        key_of, id_of, time_of, copies = self._key, self._id, self._time, self._copies
        encoded: list[Encoded] = []
        rejected: list[Rejected] = []
        for i, event in enumerate(events):
            source, fields = event.source, event.fields
            try:
                key = render_id(key_of(fields))
                record["event_id"] = render_id(id_of(fields))
                record["key"] = key
                record["score"] = scores[i]
                record["label"] = labels[i]
                record["predicted_class"] = texts[i]
                record["probabilities"] = probabilities[i]
                record["outputs"] = extras[i]
                event_time = epoch_ms(time_of(fields)) if time_of else source.timestamp_ms
                if event_time is not None and not _MIN_TIME_MS <= event_time <= _MAX_TIME_MS:
                    raise ValueError(f"event time {event_time} ms is outside years 1-9999: readers cannot decode it")
                record["event_time"] = event_time
                record["source_topic"] = source.topic
                record["source_partition"] = source.partition
                record["source_offset"] = source.offset
                for name, get in copies:
                    record[name] = get(fields)
                buffer.seek(0)
                buffer.truncate()
                buffer.write(prefix)
                write(buffer, schema, record)
            except Exception as exc:  # noqa: BLE001 - whatever one record's values do, only that record fails
                rejected.append(Rejected.from_error(source, ENCODE_STAGE, exc))
                continue
            base = common.get((source.topic, source.partition))
            if base is None:
                base = common[(source.topic, source.partition)] = [
                    (HEADER_MODEL_NAME, name_header),
                    (HEADER_MODEL_VERSION, version_header),
                    (HEADER_SOURCE_TOPIC, source.topic.encode()),
                    (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
                ]
            encoded.append(
                Encoded(
                    source,
                    None if key is None else key.encode(),
                    buffer.getvalue(),
                    [*base, (HEADER_SOURCE_OFFSET, str(source.offset).encode())],
                )
            )
        return encoded, rejected


def decode_prediction(schema: fastavro.types.Schema, value: bytes) -> dict[str, object]:
    """Read one prediction record (for tools and tests)."""
    record = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    assert isinstance(record, dict)
    return record
