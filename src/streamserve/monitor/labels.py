"""The labels topic: schemaless Avro records of ``schemas/label.avsc`` (event id, true label or value, time).

A record that is not such a record (garbage bytes, a truncated record, trailing bytes), and one whose label is
of the wrong type for the model (null; a fraction for a classifier; text for a regressor; NaN), is rejected with
its reason; the monitor counts it and sends it to the labels' dead-letter topic.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import fastavro

from streamserve.pipeline.decode import LocalSchemaDecoder
from streamserve.schemas import bundled

Task = Literal["classification", "regression"]

UNDECODABLE = "undecodable"
WRONG_TYPE = "wrong_type"
UNKNOWN_EVENT = "unknown_event"
DUPLICATE = "duplicate"
EXPIRED = "expired"
REASONS = (UNDECODABLE, WRONG_TYPE, UNKNOWN_EVENT, DUPLICATE, EXPIRED)
"""Why a label is not used: dead-letter reasons, and values of the ``outcome`` label of the labels counter
(beside ``forwarded``: decoded and passed on to the join)."""

_SCHEMA = bundled("label")
_DECODER = LocalSchemaDecoder(_SCHEMA)
"""Reads a batch of label records with one fastavro call (label_time as epoch ms)."""


class BadLabel(Exception):
    """A label the monitor cannot use; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Label:
    event_id: str
    value: str | float
    """The class as text (classifiers) or the true value (regressors)."""
    time_ms: int


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def millis(value: Any) -> int:
    """Epoch milliseconds of a timestamp-millis value as fastavro reads it (an aware datetime) or an int."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // timedelta(milliseconds=1)
    return int(value)


def decode(data: bytes | None) -> dict[str, Any]:
    """The record, or BadLabel(undecodable)."""
    if not data:
        raise BadLabel(UNDECODABLE, "empty record")
    buffer = io.BytesIO(data)
    try:
        record = fastavro.schemaless_reader(buffer, _SCHEMA, None)
    except Exception as exc:
        raise BadLabel(UNDECODABLE, f"not a Label record: {type(exc).__name__}: {exc}") from exc
    if buffer.tell() != len(data):
        raise BadLabel(UNDECODABLE, f"{len(data) - buffer.tell()} bytes after the Label record")
    if not isinstance(record, dict):
        raise BadLabel(UNDECODABLE, "not a Label record")
    return record


def class_text(value: Any) -> str:
    """A classifier's label as the text predictions carry in predicted_class (an integer 1 is class "1")."""
    if value is None:
        raise BadLabel(WRONG_TYPE, "the label is null")
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise BadLabel(WRONG_TYPE, f"a classifier's label must be a class, not the number {value!r}")
        return str(int(value))
    if isinstance(value, str) and value:
        return value
    raise BadLabel(WRONG_TYPE, f"a classifier's label must be a class, got {value!r}")


def true_value(value: Any) -> float:
    """A regressor's label as a finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadLabel(WRONG_TYPE, f"a regressor's label must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise BadLabel(WRONG_TYPE, f"a regressor's label must be finite, got {number!r}")
    return number


def parse(data: bytes | None, task: Task) -> Label:
    """A usable label from a labels-topic record, or BadLabel with its reason."""
    return _label(decode(data), task)


def parse_many(values: list[bytes | None], task: Task) -> list[Label | BadLabel]:
    """Per value, its usable label or the BadLabel saying why not (one fastavro read for the batch)."""
    found: list[Label | BadLabel] = []
    for record in _DECODER.decode_many(values):
        if isinstance(record, Exception):
            found.append(BadLabel(UNDECODABLE, f"not a Label record: {record}"))
            continue
        try:
            found.append(_label(record, task))
        except BadLabel as exc:
            found.append(exc)
    return found


def _label(record: dict[str, Any], task: Task) -> Label:
    event_id = record.get("event_id")
    if not isinstance(event_id, str) or not event_id:
        raise BadLabel(WRONG_TYPE, "the label has no event_id")
    raw = record.get("label")
    value: str | float = class_text(raw) if task == "classification" else true_value(raw)
    return Label(event_id, value, millis(record["label_time"]))


def encode(event_id: str, label: str | int | float | None, time_ms: int) -> bytes:
    """A labels-topic record (for producers of labels, the demo and the tests)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, _SCHEMA, {"event_id": event_id, "label": label, "label_time": time_ms})
    return buffer.getvalue()
