"""The sampled feature log: a share of the scored events with the inputs exactly as the model was fed them.

``FeatureLog`` is the processor's ``ScoredTap`` (pipeline/process.py): after a live lane is scored and encoded,
it picks the rows whose event id hashes below the share (crc32, so every replay and every worker picks the same
events) and writes them as ``schemas/feature_log.avsc`` records. The records travel with the batch's predictions
(``BatchResult.side``) under the same delivery guarantee; one the sink refuses is dropped, never the prediction.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamserve.config import InputSettings
from streamserve.pipeline import featurelogavro as avro
from streamserve.pipeline.encode import EncodedBatch
from streamserve.pipeline.fields import epoch_ms, getter, render_id, text_getter
from streamserve.pipeline.infer import OnnxModel
from streamserve.records import Event, Headers, ModelOutputs
from streamserve.schemas import bundled

log = logging.getLogger(__name__)

HASH_RANGE = 2**32
"""crc32 gives values in [0, 2**32): an event is logged when its id's hash is below share * HASH_RANGE."""


def sample_hash(event_id: str | None, event: Event) -> int:
    """The event's sampling hash: crc32 of its id, or of its topic/partition/offset when it has none."""
    if event_id is None:
        source = event.source
        return zlib.crc32(f"{source.topic}/{source.partition}/{source.offset}".encode())
    return zlib.crc32(event_id.encode("utf-8", "surrogatepass"))


def feature_value(column: np.ndarray, row: int) -> Any:
    """One row of a feature column as the Avro map value: a float, a string, a list of floats (a vector), None."""
    value = column[row]
    if column.ndim == 2:
        return [float(v) for v in value]
    if column.dtype == object:
        return None if value is None else str(value)
    return float(value)


class FeatureLog:
    """Picks the scored events to log and writes their feature-log records (a ``ScoredTap``)."""

    def __init__(self, topic: str, share: float, input_settings: InputSettings, event_schema: Any | None) -> None:
        self.topic = topic
        self.threshold = int(share * HASH_RANGE)
        """Hashes below this are logged (share 1.0 logs every event)."""
        self._schema = bundled("feature_log")
        self._id = text_getter(input_settings.event_id_field, event_schema)
        self._time = getter(input_settings.event_time_field) if input_settings.event_time_field else None

    def chosen(self, events: Sequence[Event]) -> list[int]:
        """Positions of the events that are logged (per batch: one id read and one crc32 per event)."""
        if self.threshold >= HASH_RANGE:
            return list(range(len(events)))
        if self.threshold <= 0:
            return []
        ids = self._ids(events)
        threshold, crc32 = self.threshold, zlib.crc32
        try:
            return [i for i, event_id in enumerate(ids) if crc32(event_id.encode()) < threshold]  # type: ignore[union-attr]
        except (AttributeError, UnicodeEncodeError):  # a null id, or text that is no UTF-8: event by event
            return [i for i, event in enumerate(events) if sample_hash(ids[i], event) < threshold]

    def _ids(self, events: Sequence[Event]) -> list[str | None]:
        """The events' ids as text, for the whole batch at once when every id reads."""
        get = self._id
        try:
            ids = [get(event.fields) for event in events]
        except (KeyError, IndexError, TypeError, ValueError):
            return [self._event_id(event) for event in events]
        return ids if set(map(type, ids)) <= {str} else [render_id(value) for value in ids]

    def scored(
        self,
        events: Sequence[Event],
        columns: dict[str, np.ndarray],
        rows: np.ndarray,
        outputs: ModelOutputs,
        model: OnnxModel,
    ) -> tuple[str, EncodedBatch] | None:
        """The feature-log records of the chosen events of one scored lane: event i was fed the columns' row
        rows[i] and has the outputs' row i."""
        chosen = self.chosen(events)
        if not chosen:
            return None
        rows_of = [int(rows[position]) for position in chosen]
        keys = [avro.text(name) for name in columns]
        try:  # per feature, its values at the chosen rows, written for the map once
            values = [avro.feature_values(column, rows_of) for column in columns.values()]
        except (ValueError, TypeError, OverflowError) as exc:  # a log record is never worth a prediction
            log.warning("feature log: a batch of %s %s cannot be written: %s", model.name, model.version, exc)
            return None
        shared = avro.text(model.name) + avro.text(model.version)
        logged_at = avro.varint(int(time.time() * 1000))
        headers: Headers = [("streamserve.model.version", model.version.encode())]
        scores = outputs.score[chosen].tolist()
        out = EncodedBatch()
        for i, position in enumerate(chosen):
            event = events[position]
            event_id = self._event_id(event)
            try:
                record = b"".join(
                    (
                        avro.optional_text(event_id),
                        avro.optional_long(self._event_time(event)),
                        shared,
                        avro.double(scores[i]),
                        avro.label(_label(outputs, position)),
                        avro.feature_map(keys, [column[i] for column in values]),
                        logged_at,
                    )
                )
            except ValueError as exc:  # an id that is no UTF-8 (lone surrogates): this record only is left out
                log.warning("feature log: event %r cannot be written: %s", event_id, exc)
                continue
            out.sources.append(event.source)
            out.keys.append(None if event_id is None else event_id.encode())
            out.values.append(record)
            out.headers.append(headers)
        return (self.topic, out) if len(out) else None

    def _event_id(self, event: Event) -> str | None:
        try:
            return render_id(self._id(event.fields))
        except (KeyError, IndexError, TypeError, ValueError):  # an id the prediction could not read either
            return None

    def _event_time(self, event: Event) -> int | None:
        if self._time is None:
            return event.source.timestamp_ms
        try:
            value = self._time(event.fields)
            return value if type(value) is int else epoch_ms(value)
        except (KeyError, IndexError, TypeError, ValueError):
            return None


def _label(outputs: ModelOutputs, row: int) -> int | str | None:
    if outputs.label_text is not None:
        return str(outputs.label_text[row])
    if outputs.label is not None:
        return int(outputs.label[row])
    return None
