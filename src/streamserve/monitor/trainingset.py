"""The retraining set: the feature log joined with the labels topic by event id.

A feature-log record (schemas/feature_log.avsc: the inputs as the model was fed them, the prediction, the version)
and the event's label (schemas/label.avsc), whichever comes first, make one training example
(schemas/training_example.avsc), written to the training-set topic keyed by event id.

Why a plain confluent-kafka consumer and not a faust table: the feature log is a sample chosen by a hash of the
event id, so a label whose id hashes outside the share is dropped on sight, and what waits for its partner is
only the sampled events still unlabelled (or labels of sampled events whose log record is late): a small,
bounded in-memory buffer (``max_pending``; the oldest goes first and is counted as expired). No changelog is
needed: the training-set topic is compacted and keyed by event id, so after a restart the join re-reads both
topics from their start and writes the same examples again, which compaction (and the export) deduplicates.

No record's content stops the join: bytes that are no record, a label of the wrong type, a label for an unknown
id, a second label for an id are counted (``JoinCounts``) and skipped.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fastavro

from streamserve.pipeline.featurelog import HASH_RANGE
from streamserve.schemas import bundled

log = logging.getLogger(__name__)

_UNREADABLE = (EOFError, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, OverflowError, MemoryError)
_LABEL_TYPES = (int, str, float)


@dataclass
class JoinCounts:
    """What the join did with what it read."""

    examples: int = 0
    bad_labels: int = 0
    """Label records that could not be read, or whose label is missing or of no label type."""
    bad_logs: int = 0
    """Feature-log records that could not be read or carry no event id."""
    unsampled: int = 0
    """Labels of events the feature log did not sample (their id hashes outside the share)."""
    duplicates: int = 0
    """A second label, or log record, for an event already joined."""
    expired: int = 0
    """Records that waited for their partner until the buffer was full and were dropped, oldest first."""


def _read(value: bytes | None, schema: Any) -> dict[str, Any] | None:
    if not value:
        return None
    stream = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(stream, schema, None)
    except _UNREADABLE:
        return None
    if not isinstance(record, dict) or stream.tell() != len(value):
        return None
    return record


def _millis(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return int(value.timestamp() * 1000)


class TrainingJoin:
    """Pairs feature-log records with labels by event id; both sides may come first."""

    def __init__(self, share: float = 1.0, max_pending: int = 100_000) -> None:
        self.threshold = int(share * HASH_RANGE)
        """Labels of ids hashing at or above this were never logged: dropped at once."""
        self.max_pending = max_pending
        self.counts = JoinCounts()
        self._log_schema = bundled("feature_log")
        self._label_schema = bundled("label")
        self._out_schema = bundled("training_example")
        self._logs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._labels: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._joined: OrderedDict[str, None] = OrderedDict()
        """Recently joined ids (bounded like the buffers): their repeats are duplicates."""

    def offer_log(self, value: bytes | None) -> tuple[bytes, bytes] | None:
        """A feature-log record; (key, example) when its label was waiting."""
        record = _read(value, self._log_schema)
        event_id = record.get("event_id") if record is not None else None
        if record is None or not event_id:
            self.counts.bad_logs += 1
            return None
        if event_id in self._joined or event_id in self._logs:
            self.counts.duplicates += 1
            return None
        label = self._labels.pop(event_id, None)
        if label is None:
            self._hold(self._logs, event_id, record)
            return None
        return self._example(event_id, record, label)

    def offer_label(self, value: bytes | None) -> tuple[bytes, bytes] | None:
        """A label record; (key, example) when its feature-log record was waiting."""
        record = _read(value, self._label_schema)
        if record is None or not isinstance(record.get("label"), _LABEL_TYPES) or not record.get("event_id"):
            self.counts.bad_labels += 1
            return None
        event_id = record["event_id"]
        if self.threshold < HASH_RANGE and zlib.crc32(event_id.encode("utf-8", "surrogatepass")) >= self.threshold:
            self.counts.unsampled += 1
            return None
        if event_id in self._joined or event_id in self._labels:
            self.counts.duplicates += 1
            return None
        logged = self._logs.pop(event_id, None)
        if logged is None:
            self._hold(self._labels, event_id, record)
            return None
        return self._example(event_id, logged, record)

    @property
    def pending(self) -> int:
        """Records waiting for their partner."""
        return len(self._logs) + len(self._labels)

    def _hold(self, buffer: OrderedDict[str, dict[str, Any]], event_id: str, record: dict[str, Any]) -> None:
        buffer[event_id] = record
        while len(self._logs) + len(self._labels) > self.max_pending:
            oldest = self._logs if len(self._logs) >= len(self._labels) else self._labels
            oldest.popitem(last=False)
            self.counts.expired += 1

    def _example(self, event_id: str, logged: dict[str, Any], label: dict[str, Any]) -> tuple[bytes, bytes]:
        self._joined[event_id] = None
        while len(self._joined) > self.max_pending:
            self._joined.popitem(last=False)
        example = {
            **logged,
            "event_time": _millis(logged.get("event_time")),
            "logged_at": _millis(logged["logged_at"]),
            "predicted_label": logged.get("label"),
            "label": label["label"],
            "label_time": _millis(label["label_time"]),
        }
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, self._out_schema, example)
        self.counts.examples += 1
        return event_id.encode(), buffer.getvalue()
