"""Model announcements on the compacted control topic, and worker status records."""

from __future__ import annotations

import getpass
import io
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

import fastavro

from streamserve.errors import DecodeError
from streamserve.schemas import bundled

Action = Literal["deploy", "canary", "shadow", "rollback"]


def _millis(value: Any) -> int:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


@dataclass(frozen=True)
class ModelAnnouncement:
    """The desired serving state of one model; complete on its own so compaction loses nothing."""

    model: str
    version: str
    uri: str
    sha256: str
    action: Action
    canary_share: float = 0.0
    baseline_version: str | None = None
    baseline_uri: str | None = None
    baseline_sha256: str | None = None
    announced_at: int = 0
    announced_by: str = ""
    notes: str | None = None

    @classmethod
    def now(cls, **fields: Any) -> ModelAnnouncement:
        """An announcement stamped with the current time and user@host."""
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        return cls(announced_at=int(time.time() * 1000), announced_by=by, **fields)

    def encode(self) -> bytes:
        """Avro bytes for the control topic."""
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, bundled("model_announcement"), asdict(self))
        return buffer.getvalue()

    @classmethod
    def decode(cls, value: bytes) -> ModelAnnouncement:
        """Parse a control-topic record."""
        try:
            record = fastavro.schemaless_reader(io.BytesIO(value), bundled("model_announcement"), None)
        except (EOFError, ValueError, TypeError, KeyError) as exc:
            raise DecodeError(f"not a model announcement: {exc}") from exc
        assert isinstance(record, dict)
        record["announced_at"] = _millis(record["announced_at"])
        return cls(**record)


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker serves for one model, reported on the status topic."""

    worker_id: str
    model: str
    state: str
    serving_version: str
    serving_uri: str
    serving_sha256: str
    mode: str
    candidate_version: str | None
    canary_share: float
    loading_version: str | None
    rejected_version: str | None
    reason: str | None
    since: int
    reported_at: int

    def encode(self) -> bytes:
        """Avro bytes for the status topic."""
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, bundled("worker_status"), asdict(self))
        return buffer.getvalue()

    @classmethod
    def decode(cls, value: bytes) -> WorkerStatus:
        """Parse a status-topic record."""
        record = fastavro.schemaless_reader(io.BytesIO(value), bundled("worker_status"), None)
        assert isinstance(record, dict)
        record["since"] = _millis(record["since"])
        record["reported_at"] = _millis(record["reported_at"])
        return cls(**record)
