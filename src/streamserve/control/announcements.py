"""Model announcements on the control topic, and worker status records."""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import socket
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Any, Literal

import fastavro

from streamserve.errors import DecodeError
from streamserve.schemas import bundled

Action = Literal["deploy", "canary", "shadow", "rollback"]

ANNOUNCEMENT_V1 = "model_announcement"
"""The schema every announcement without a profile is written with (and every record written before profiles)."""
ANNOUNCEMENT_V2 = "model_announcement_v2"
"""Version 1 plus the reference profile's URI and digest (nullable, at the end)."""
CANONICAL_PREFIX = b"streamserve.model-announcement.v1\n"
"""Domain separation: a signature over an announcement cannot be passed off as one over anything else."""


def _millis(value: Any) -> int:
    return int(value.timestamp() * 1000) if isinstance(value, datetime) else int(value)


_UNREADABLE = (EOFError, ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, OverflowError, MemoryError)
"""What fastavro raises on bytes that are not a record of the schema (OverflowError: a timestamp out of range)."""


def _read(value: bytes, schema: str, whole: bool = False) -> dict[str, Any]:
    """One record of a bundled schema; DecodeError for anything else, whatever the bytes hold (``whole``: also
    when bytes are left over after the record)."""
    stream = io.BytesIO(value)
    try:
        record = fastavro.schemaless_reader(stream, bundled(schema), None)
    except _UNREADABLE as exc:
        raise DecodeError(f"not a {schema.replace('_', ' ')}: {type(exc).__name__}: {exc}"[:500]) from exc
    if not isinstance(record, dict):
        raise DecodeError(f"not a {schema.replace('_', ' ')}: not a record")
    if whole and stream.tell() != len(value):
        raise DecodeError(f"not a {schema.replace('_', ' ')}: {len(value) - stream.tell()} bytes left over")
    return record


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
    generation: int = 0
    key_id: str | None = None
    signature: bytes | None = None
    profile_uri: str | None = None
    """The version's reference profile (pipeline/profile.py), stored beside the artifact; None: no drift check."""
    profile_sha256: str | None = None
    """Its digest: a profile whose bytes differ rejects the version, as a bad artifact does."""

    @classmethod
    def now(cls, **fields: Any) -> ModelAnnouncement:
        """An announcement stamped with the current time and user@host."""
        by = f"{getpass.getuser()}@{socket.gethostname()}"
        return cls(announced_at=int(time.time() * 1000), announced_by=by, **fields)

    def canonical(self) -> bytes:
        """The bytes a signature covers: every field but the signature, as sorted compact JSON."""
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "signature"}
        if self.profile_uri is None and self.profile_sha256 is None:  # as before profiles: old signatures verify
            del body["profile_uri"], body["profile_sha256"]
        return CANONICAL_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def unsigned(self) -> ModelAnnouncement:
        """The same announcement without key id and signature."""
        return replace(self, key_id=None, signature=None)

    def record_key(self) -> bytes:
        """Control-topic key: one per distinct announcement, so compaction only drops exact duplicates
        (a rejected record can never compact an accepted one away)."""
        content = hashlib.sha256(self.encode()).hexdigest()[:16]
        return f"{self.model}/{self.generation}/{content}".encode()

    def encode(self) -> bytes:
        """Avro bytes for the control topic: schema version 1 without a profile (any worker reads it), else 2."""
        buffer = io.BytesIO()
        record = asdict(self)
        if self.profile_uri is None and self.profile_sha256 is None:
            del record["profile_uri"], record["profile_sha256"]
            fastavro.schemaless_writer(buffer, bundled(ANNOUNCEMENT_V1), record)
        else:
            fastavro.schemaless_writer(buffer, bundled(ANNOUNCEMENT_V2), record)
        return buffer.getvalue()

    @classmethod
    def decode(cls, value: bytes) -> ModelAnnouncement:
        """Parse a control-topic record of either schema version (2 first: a version-2 record read as version 1
        would lose its profile; a version-1 record read as version 2 ends early and fails)."""
        try:
            record = _read(value, ANNOUNCEMENT_V2, whole=True)
        except DecodeError:
            record = _read(value, ANNOUNCEMENT_V1)
        record["announced_at"] = _millis(record["announced_at"])
        return cls(**record)


@dataclass(frozen=True)
class WorkerStatus:
    """What one worker serves for one model, what the control topic asks for, and its last rejection."""

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
    serving_generation: int = 0
    desired_generation: int = 0
    desired_version: str | None = None
    desired_mode: str | None = None
    rejected_generation: int | None = None
    rejected_at: int | None = None

    def encode(self) -> bytes:
        """Avro bytes for the status topic."""
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, bundled("worker_status"), asdict(self))
        return buffer.getvalue()

    @classmethod
    def decode(cls, value: bytes) -> WorkerStatus:
        """Parse a status-topic record."""
        record = _read(value, "worker_status")
        for name in ("since", "reported_at", "rejected_at"):
            if record.get(name) is not None:
                record[name] = _millis(record[name])
        return cls(**record)
