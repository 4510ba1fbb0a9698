"""Avro encoding of predictions and the headers that travel with them."""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

import fastavro
import numpy as np

from streamserve.config import InputSettings
from streamserve.pipeline.decode import load_schema
from streamserve.records import Event, Headers, ModelOutputs

HEADER_MODEL_NAME = "streamserve.model.name"
HEADER_MODEL_VERSION = "streamserve.model.version"
HEADER_SOURCE_TOPIC = "streamserve.source.topic"
HEADER_SOURCE_PARTITION = "streamserve.source.partition"
HEADER_SOURCE_OFFSET = "streamserve.source.offset"


class PredictionEncoder:
    """Turns a batch's model outputs into (key, Avro value, headers) triples, one per event."""

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
        now_ms = int(time.time() * 1000)
        scores = outputs.score.tolist()
        labels = outputs.label.tolist() if outputs.label is not None else [None] * len(events)
        version_header = model_version.encode()
        name_header = model_name.encode()
        encoded = []
        buffer = io.BytesIO()
        for event, score, label in zip(events, scores, labels, strict=True):
            source = event.source
            fields = event.fields
            key = str(fields[self._key_field])
            event_time = fields[self._time_field] if self._time_field else source.timestamp_ms
            if not isinstance(event_time, int):  # fastavro decodes timestamp-millis to datetime
                event_time = int(event_time.timestamp() * 1000)
            buffer.seek(0)
            buffer.truncate()
            fastavro.schemaless_writer(
                buffer,
                self.schema,
                {
                    "event_id": str(fields[self._id_field]),
                    "key": key,
                    "model_name": model_name,
                    "model_version": model_version,
                    "score": score,
                    "label": label,
                    "event_time": event_time,
                    "prediction_time": now_ms,
                    "source_topic": source.topic,
                    "source_partition": source.partition,
                    "source_offset": source.offset,
                    "degraded": degraded,
                },
            )
            headers: Headers = [
                (HEADER_MODEL_NAME, name_header),
                (HEADER_MODEL_VERSION, version_header),
                (HEADER_SOURCE_TOPIC, source.topic.encode()),
                (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
                (HEADER_SOURCE_OFFSET, str(source.offset).encode()),
            ]
            encoded.append((key.encode(), buffer.getvalue(), headers))
        return encoded


def finite_rows(outputs: ModelOutputs) -> np.ndarray:
    """Boolean mask of rows whose score is a finite number."""
    return np.isfinite(outputs.score)


def decode_prediction(schema: fastavro.types.Schema, value: bytes) -> dict[str, object]:
    """Read one prediction record (for tools and tests)."""
    record = fastavro.schemaless_reader(io.BytesIO(value), schema, None)
    assert isinstance(record, dict)
    return record
