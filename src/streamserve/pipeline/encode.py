"""Avro encoding of predictions and the headers that travel with them."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fastavro

from streamserve.config import InputSettings
from streamserve.pipeline.decode import load_schema
from streamserve.records import Event, Headers, ModelOutputs

HEADER_MODEL_NAME = "streamserve.model.name"
HEADER_MODEL_VERSION = "streamserve.model.version"
HEADER_SOURCE_TOPIC = "streamserve.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.source.offset"


class PredictionEncoder:
    """Turns a batch's model outputs into (key, Avro value, headers) triples, one per event.

    Values are written by fastavro with the parsed schema into one reused buffer; everything that is
    the same for the whole batch (model, version, prediction time, header values) is computed once.
    """

    def __init__(self, schema_path: Path, input_settings: InputSettings) -> None:
        self.schema = load_schema(schema_path)
        self._key_field = input_settings.key_field
        self._id_field = input_settings.event_id_field
        self._time_field = input_settings.event_time_field

    def encode(
        self,
        events: Sequence[Event],
        outputs: ModelOutputs,
        model_name: str,
        model_version: str,
        degraded: bool = False,
    ) -> list[tuple[bytes, bytes, Headers]]:
        """Encode one record per event; outputs are aligned with events."""
        if not events:
            return []
        scores = outputs.score.tolist()
        labels = outputs.label.tolist() if outputs.label is not None else [None] * len(events)
        record: dict[str, Any] = {
            "model_name": model_name,
            "model_version": model_version,
            "prediction_time": int(time.time() * 1000),
            "degraded": degraded,
        }
        name_header, version_header = model_name.encode(), model_version.encode()
        common: dict[tuple[str, int], Headers] = {}  # every header but the offset, per source partition
        write, schema, buffer = fastavro.schemaless_writer, self.schema, io.BytesIO()
        key_field, id_field, time_field = self._key_field, self._id_field, self._time_field
        encoded = []
        for event, score, label in zip(events, scores, labels, strict=True):
            source, fields = event.source, event.fields
            key = str(fields[key_field])
            record["event_id"] = str(fields[id_field])
            record["key"] = key
            record["score"] = score
            record["label"] = label
            record["event_time"] = _epoch_ms(fields[time_field]) if time_field else source.timestamp_ms
            record["source_topic"] = source.topic
            record["source_partition"] = source.partition
            record["source_offset"] = source.offset
            buffer.seek(0)
            buffer.truncate()
            write(buffer, schema, record)
            base = common.get((source.topic, source.partition))
            if base is None:
                base = common[(source.topic, source.partition)] = [
                    (HEADER_MODEL_NAME, name_header),
                    (HEADER_MODEL_VERSION, version_header),
                    (HEADER_SOURCE_TOPIC, source.topic.encode()),
                    (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
                ]
            encoded.append(
                (key.encode(), buffer.getvalue(), [*base, (HEADER_SOURCE_OFFSET, str(source.offset).encode())])
            )
        return encoded


def _epoch_ms(value: Any) -> int:
    """Epoch milliseconds of an int or of a datetime (fastavro decodes timestamp-millis to an aware datetime)."""
    if isinstance(value, int):
        return value
    if value.tzinfo is not None:
        return (value - _EPOCH) // _ONE_MS  # exact, unlike float seconds
    return int(value.timestamp() * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def decode_prediction(schema: fastavro.types.Schema, value: bytes) -> dict[str, object]:
    """Read one prediction record (for tools and tests)."""
    record = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    assert isinstance(record, dict)
    return record
