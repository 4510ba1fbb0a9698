"""Feature ages (streamserve_feature_age_seconds) sampled from a Redis reply: one flat list of keys x fields with
the update stamp last; absent, unreadable and failed keys' stamps are skipped, and at most MAX_AGE_SAMPLES keys
(evenly spaced) are read per key group and batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from streamserve.observe.metrics import WorkerMetrics
from streamserve.observe.telemetry import MAX_AGE_SAMPLES, Telemetry
from streamserve.pipeline.features import FeatureRequest, Replies

KEYS = 200
FAILED = {3, 9}  # answer garbage stamps (0: an age of decades) that must not be read
ABSENT = {6}
UNREADABLE = {12}


def stamp(key: int, now_ms: float) -> bytes | None:
    if key in FAILED:
        return b"0"
    if key in ABSENT:
        return None
    if key in UNREADABLE:
        return b"yesterday"
    return repr(now_ms - key * 1000.0).encode()  # key k is k seconds old


def test_ages_read_the_stamp_column_of_flat_replies() -> None:
    now_ms = time.time() * 1000
    requests: list[FeatureRequest] = [
        (["x", "y", "updated_at"], [f"card:{k}" for k in range(KEYS)]),
        (None, ["packed:1"]),  # packed vectors carry no stamp
        (["risk"], ["merchant:1"]),  # a group without a stamp
    ]
    flat = [value for k in range(KEYS) for value in (b"1.5", b"2", stamp(k, now_ms))]

    def fetch(asked: Sequence[FeatureRequest]) -> list[Replies]:
        assert asked == requests
        return [Replies(flat, {k: RuntimeError("WRONGTYPE") for k in FAILED}), Replies([b"\0" * 4]), Replies([b"7"])]

    telemetry = Telemetry(WorkerMetrics("w", lambda: ("m", "1"), lambda: 0), None, updated_at_fields=["updated_at"])
    telemetry.replies_read(requests, fetch(requests), 0.002)

    step = max(1, KEYS // MAX_AGE_SAMPLES)
    sampled = [k for k in range(0, KEYS, step) if k not in FAILED | ABSENT | UNREADABLE]
    assert step > 1  # sampled, not every key
    assert len(range(0, KEYS, step)) > len(sampled)  # the keys to skip fall on sampled positions
    assert telemetry.feature_age.count(["updated_at"]) == len(sampled)
    family = telemetry.feature_age.family()
    total = next(s.value for s in family.samples if s.name.endswith("_sum"))
    assert total == pytest.approx(sum(sampled), abs=len(sampled) * 1.0)  # seconds; the test runs well within one
