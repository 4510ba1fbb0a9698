"""Feature building: event fields plus Redis hashes, one pipelined round trip per micro-batch."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from streamserve.config import FeatureSpec, RedisSettings
from streamserve.errors import EnrichError, FeatureError
from streamserve.records import Event, FeatureBatch, Rejected

log = logging.getLogger(__name__)

_PARSERS: dict[str, Callable[[Any], float]] = {
    "float32": float,
    "float64": float,
    "int32": lambda raw: float(int(raw)),
    "int64": lambda raw: float(int(raw)),
    "bool": lambda raw: float(raw in (True, 1, b"1", b"true", b"True", "1", "true", "True")),
}


@dataclass(frozen=True, slots=True)
class _KeyGroup:
    """Redis features that share a key template: one HMGET per distinct key in the batch."""

    template: str
    fields: tuple[str, ...]
    updated_at_field: str | None


FetchHashes = Callable[[Sequence[tuple[list[str], list[str]]]], list[dict[str, list[Any]]]]
"""Given (fields, distinct keys) per key group, the field values of every key, per group."""


def redis_fetcher(client: redis.Redis, settings: RedisSettings) -> FetchHashes:
    """HMGET every key of every group in one pipelined round trip; retry with backoff on failure."""

    def fetch(requests: Sequence[tuple[list[str], list[str]]]) -> list[dict[str, list[Any]]]:
        return _redis_fetch_with_retry(client, requests, settings)

    return fetch


def _redis_fetch_with_retry(
    client: redis.Redis, requests: Sequence[tuple[list[str], list[str]]], settings: RedisSettings
) -> list[dict[str, list[Any]]]:
    attempt = 0
    while True:
        try:
            pipe = client.pipeline(transaction=False)
            for fields, group_keys in requests:
                for key in group_keys:
                    pipe.hmget(key, fields)
            replies = pipe.execute()
            break
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if attempt >= settings.retries and settings.on_error != "wait":
                raise EnrichError(
                    f"Redis unavailable after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                ) from exc
            delay = min(settings.backoff_ms * 2 ** min(attempt, 16), settings.max_backoff_ms) / 1000
            limit = "until it answers" if settings.on_error == "wait" else f"of {settings.retries}"
            log.warning("Redis error (%s), retry %d %s in %.2fs", exc, attempt + 1, limit, delay)
            time.sleep(delay)
            attempt += 1
    results: list[dict[str, list[Any]]] = []
    position = 0
    for _, group_keys in requests:
        results.append(dict(zip(group_keys, replies[position : position + len(group_keys)], strict=True)))
        position += len(group_keys)
    return results


class FeatureBuilder:
    """Builds the float32 model-input matrix for a batch of events, in the feature spec's order."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        fetch: FetchHashes | None,
        clock_ms: Callable[[], float] = lambda: time.time() * 1000,
    ) -> None:
        self.features = list(features)
        self._fetch = fetch
        self._clock_ms = clock_ms
        groups: dict[str, list[FeatureSpec]] = {}
        for spec in self.features:
            if spec.source == "redis":
                groups.setdefault(spec.key or "", []).append(spec)
        self._groups = [
            _KeyGroup(
                template=template,
                fields=tuple(dict.fromkeys(spec.field for spec in specs)),
                updated_at_field=next((s.updated_at_field for s in specs if s.updated_at_field), None),
            )
            for template, specs in groups.items()
        ]
        if self._groups and fetch is None:
            raise ValueError("Redis features need a Redis fetcher")

    @property
    def width(self) -> int:
        """Number of model inputs per event."""
        return len(self.features)

    def build(self, events: Sequence[Event], redis_available: bool = True) -> FeatureBatch:
        """Matrix for the events whose features could be built; the others are rejected with a reason.

        With ``redis_available=False`` every Redis feature takes its default and the batch is flagged
        degraded (the ``defaults`` policy for feature-store outages).
        """
        n = len(events)
        reasons: dict[int, str] = {}
        keys_per_event = self._render_keys(events, reasons)
        degraded = bool(self._groups) and not redis_available
        if degraded:
            lookups: list[dict[str, list[Any]]] = [{} for _ in self._groups]
        else:
            lookups = self._lookup(keys_per_event) if self._groups else []
        now_ms = self._clock_ms()
        columns = np.empty((n, self.width), dtype=np.float64)
        missing_defaults = stale_defaults = 0
        for col, spec in enumerate(self.features):
            if spec.source == "event":
                raw = [event.fields.get(spec.field) for event in events]
                stale = None
            else:
                group_index = next(i for i, g in enumerate(self._groups) if g.template == spec.key)
                group = self._groups[group_index]
                field_index = group.fields.index(spec.field)
                replies = [
                    lookups[group_index].get(keys[group_index]) if keys is not None else None for keys in keys_per_event
                ]
                raw = [reply[field_index] if reply is not None else None for reply in replies]
                stale = self._stale_mask(spec, group, replies, now_ms)
            values = self._parse_column(spec, raw, reasons)
            missing = np.isnan(values)
            if stale is not None:
                stale &= ~missing
                values[stale] = np.nan
            bad = np.isnan(values)
            if spec.default is not None:
                values[bad] = spec.default
                missing_defaults += int(missing.sum())
                stale_defaults += int(stale.sum()) if stale is not None else 0
            else:
                for row in np.flatnonzero(bad):
                    why = "stale" if stale is not None and stale[row] else "missing or NaN"
                    reasons.setdefault(int(row), f"feature {spec.name!r}: {why} and no default")
            columns[:, col] = values
        keep = [row for row in range(n) if row not in reasons]
        return FeatureBatch(
            events=[events[row] for row in keep],
            matrix=columns[keep].astype(np.float32) if reasons else columns.astype(np.float32),
            missing_defaults=missing_defaults,
            stale_defaults=stale_defaults,
            degraded=degraded,
            rejected=[
                Rejected(events[row].source, FeatureError.stage, FeatureError.__name__, reason)
                for row, reason in sorted(reasons.items())
            ],
        )

    def _render_keys(self, events: Sequence[Event], reasons: dict[int, str]) -> list[list[str] | None]:
        rendered: list[list[str] | None] = []
        for row, event in enumerate(events):
            try:
                rendered.append([group.template.format_map(event.fields) for group in self._groups])
            except (KeyError, ValueError, IndexError) as exc:
                reasons[row] = f"cannot build a Redis key from the event: {type(exc).__name__}: {exc}"
                rendered.append(None)
        return rendered

    def _lookup(self, keys_per_event: list[list[str] | None]) -> list[dict[str, list[Any]]]:
        assert self._fetch is not None
        requests = [
            (
                [*group.fields, *([group.updated_at_field] if group.updated_at_field else [])],
                list(dict.fromkeys(keys[i] for keys in keys_per_event if keys is not None)),
            )
            for i, group in enumerate(self._groups)
        ]
        return self._fetch(requests)

    @staticmethod
    def _stale_mask(
        spec: FeatureSpec, group: _KeyGroup, replies: list[list[Any] | None], now_ms: float
    ) -> np.ndarray | None:
        if spec.max_age_s is None:
            return None
        oldest_ms = now_ms - spec.max_age_s * 1000
        stamp_index = len(group.fields)
        stamps = np.fromiter(
            (
                float(reply[stamp_index]) if reply is not None and reply[stamp_index] is not None else -math.inf
                for reply in replies
            ),
            dtype=np.float64,
            count=len(replies),
        )
        return stamps < oldest_ms

    @staticmethod
    def _parse_column(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
        parse = _PARSERS[spec.dtype]
        try:
            return np.fromiter(
                (math.nan if value is None else parse(value) for value in raw), dtype=np.float64, count=len(raw)
            )
        except (TypeError, ValueError):
            pass
        values = np.full(len(raw), math.nan)
        for row, value in enumerate(raw):
            if value is None:
                continue
            try:
                values[row] = parse(value)
            except (TypeError, ValueError):
                reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r} as {spec.dtype}")
        return values
