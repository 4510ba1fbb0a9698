"""Feature building: event fields plus Redis entities, one pipelined round trip per micro-batch.

An entity is a Redis hash (one field per feature, HMGET per distinct key) or a packed little-endian
float32 vector (one value per entity, MGET of all a batch's keys in one command). Values are parsed
once per distinct key and the batch's matrix is assembled with numpy, not per event.
"""

from __future__ import annotations

import contextlib
import logging
import math
import string
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
# Python types whose values numpy turns into the same float as the dtype's parser does.
_NUMERIC_TYPES: dict[str, set[type]] = {
    "float32": {float, int, bool},
    "float64": {float, int, bool},
    "int32": {int, bool},
    "int64": {int, bool},
    "bool": {bool},
}
_NONE = type(None)
_FLOAT32 = np.dtype("<f4")


@dataclass(frozen=True, slots=True)
class _KeyGroup:
    """Redis features that share a key template: one HMGET per distinct key, or one MGET (packed)."""

    template: str
    fields: tuple[str, ...]
    updated_at_field: str | None
    packed: bool = False
    width: int = 0
    """Elements of the packed vector the features use (largest index + 1)."""


FeatureRequest = tuple[list[str] | None, list[str]]
"""(hash fields, distinct keys) of one key group; fields None asks for the keys' packed vectors (MGET)."""
FetchFeatures = Callable[[Sequence[FeatureRequest]], list[dict[str, Any]]]
"""Given one request per key group, per group a dict from key to its reply: the list of hash field
values (HMGET), or the packed vector's bytes (MGET); None for a missing key."""


def redis_fetcher(client: redis.Redis, settings: RedisSettings) -> FetchFeatures:
    """Every key of every group in one pipelined round trip; retry with backoff on failure."""

    def fetch(requests: Sequence[FeatureRequest]) -> list[dict[str, Any]]:
        return _redis_fetch_with_retry(client, requests, settings)

    return fetch


def _redis_fetch_with_retry(
    client: redis.Redis, requests: Sequence[FeatureRequest], settings: RedisSettings
) -> list[dict[str, Any]]:
    attempt = 0
    while True:
        try:
            pipe = client.pipeline(transaction=False)
            for fields, group_keys in requests:
                if fields is None:
                    if group_keys:
                        pipe.mget(group_keys)
                else:
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
    results: list[dict[str, Any]] = []
    position = 0
    for fields, group_keys in requests:
        if fields is None:
            results.append(dict(zip(group_keys, replies[position], strict=True)) if group_keys else {})
            position += 1 if group_keys else 0
        else:
            results.append(dict(zip(group_keys, replies[position : position + len(group_keys)], strict=True)))
            position += len(group_keys)
    return results


def _unpack_vectors(replies: list[Any], width: int) -> np.ndarray:
    """(keys + 1, width) float64 matrix of packed vectors; missing or short values are NaN, as is the last row."""
    out = np.full((len(replies) + 1, width), np.nan)
    size = width * _FLOAT32.itemsize
    if replies and None not in replies and set(map(len, replies)) == {size}:
        out[:-1] = np.frombuffer(b"".join(replies), dtype=_FLOAT32).reshape(len(replies), width)
        return out
    for row, value in enumerate(replies):
        if value:
            vector = np.frombuffer(value[: len(value) // _FLOAT32.itemsize * _FLOAT32.itemsize][:size], _FLOAT32)
            out[row, : len(vector)] = vector
    return out


def _key_renderer(template: str) -> Callable[[dict[str, Any]], str]:
    """``template.format_map``, as one f-string for the usual shape ``prefix{field}suffix``."""
    parts = list(string.Formatter().parse(template))
    names = [name for _, name, _, _ in parts if name is not None]
    simple = all(not spec and conversion is None for _, name, spec, conversion in parts if name is not None)
    if simple and len(names) == 1 and names[0].isidentifier():
        name, prefix = names[0], parts[0][0]
        suffix = "".join(literal for literal, *_ in parts[1:])
        return lambda fields: f"{prefix}{fields[name]}{suffix}"
    return template.format_map


class FeatureBuilder:
    """Builds the float32 model-input matrix for a batch of events, in the feature spec's order."""

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        fetch: FetchFeatures | None,
        clock_ms: Callable[[], float] = lambda: time.time() * 1000,
    ) -> None:
        self.features = list(features)
        self._fetch = fetch
        self._clock_ms = clock_ms
        groups: dict[str, list[FeatureSpec]] = {}
        for spec in self.features:
            if spec.source == "redis":
                groups.setdefault(spec.key or "", []).append(spec)
        self._groups = []
        for template, specs in groups.items():
            layouts = {spec.layout for spec in specs}
            if len(layouts) > 1:
                raise ValueError(f"features of key {template!r} mix layouts {sorted(layouts)}")
            packed = layouts == {"packed"}
            self._groups.append(
                _KeyGroup(
                    template=template,
                    fields=() if packed else tuple(dict.fromkeys(spec.field for spec in specs)),
                    updated_at_field=next((s.updated_at_field for s in specs if s.updated_at_field), None),
                    packed=packed,
                    width=max((spec.index or 0) + 1 for spec in specs) if packed else 0,
                )
            )
        self._group_of = {template: i for i, template in enumerate(groups)}
        self._renderers = [_key_renderer(group.template) for group in self._groups]
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
        keys_per_group = self._render_keys(events, reasons)
        distinct = [list(dict.fromkeys(key for key in keys if key is not None)) for keys in keys_per_group]
        degraded = bool(self._groups) and not redis_available
        if degraded or not self._groups:
            lookups: list[dict[str, Any]] = [{} for _ in self._groups]
        else:
            lookups = self._lookup(distinct)
        # Per group: the reply of each distinct key in order, and each event's row among them (the
        # extra last row stands for "no key": the template could not be filled).
        replies = [[lookup.get(key) for key in keys] for lookup, keys in zip(lookups, distinct, strict=True)]
        rows = []
        for keys, group_keys in zip(keys_per_group, distinct, strict=True):
            position: dict[str | None, int] = {key: i for i, key in enumerate(group_keys)}
            if reasons:  # some events have no key: they point at the extra "missing" row
                position[None] = len(group_keys)
            rows.append(np.fromiter(map(position.__getitem__, keys), dtype=np.intp, count=n))
        vectors = [
            _unpack_vectors(group_replies, group.width) if group.packed else None
            for group, group_replies in zip(self._groups, replies, strict=True)
        ]
        now_ms = self._clock_ms()
        columns = np.empty((n, self.width), dtype=np.float64)
        missing_defaults = stale_defaults = 0
        for col, spec in enumerate(self.features):
            stale = None
            if spec.source == "event":
                values = self._parse_column(spec, [event.fields.get(spec.field) for event in events], reasons)
            else:
                g = self._group_of[spec.key or ""]
                group, event_rows = self._groups[g], rows[g]
                packed = vectors[g]
                if packed is not None:
                    values = packed[event_rows, spec.index]
                else:
                    field_index = group.fields.index(spec.field)
                    raw = [reply[field_index] if reply is not None else None for reply in replies[g]]
                    key_reasons: dict[int, str] = {}
                    per_key = np.append(self._parse_column(spec, raw, key_reasons), np.nan)
                    values = per_key[event_rows]
                    if key_reasons:
                        for row in np.flatnonzero(np.isin(event_rows, list(key_reasons))):
                            reasons.setdefault(int(row), key_reasons[int(event_rows[row])])
                    stale = self._stale_mask(spec, group, replies[g], now_ms, event_rows)
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
            events=[events[row] for row in keep] if reasons else list(events),
            matrix=columns[keep].astype(np.float32) if reasons else columns.astype(np.float32),
            missing_defaults=missing_defaults,
            stale_defaults=stale_defaults,
            degraded=degraded,
            rejected=[
                Rejected(events[row].source, FeatureError.stage, FeatureError.__name__, reason)
                for row, reason in sorted(reasons.items())
            ],
        )

    def _render_keys(self, events: Sequence[Event], reasons: dict[int, str]) -> list[list[str | None]]:
        """Per group, the Redis key of each event (None when the event cannot fill a template)."""
        rendered: list[list[str | None]] = []
        for render in self._renderers:
            try:
                rendered.append([render(event.fields) for event in events])
                continue
            except (KeyError, ValueError, IndexError):
                pass  # find the events that cannot fill the template
            column: list[str | None] = []
            for row, event in enumerate(events):
                try:
                    column.append(render(event.fields))
                except (KeyError, ValueError, IndexError) as exc:
                    reasons.setdefault(row, f"cannot build a Redis key from the event: {type(exc).__name__}: {exc}")
                    column.append(None)
            rendered.append(column)
        for row in reasons:  # an event missing one key is rejected: fetch none of its keys
            for column in rendered:
                column[row] = None
        return rendered

    def _lookup(self, distinct: list[list[str]]) -> list[dict[str, Any]]:
        assert self._fetch is not None
        requests: list[FeatureRequest] = [
            (
                None
                if group.packed
                else [*group.fields, *([group.updated_at_field] if group.updated_at_field else [])],
                keys,
            )
            for group, keys in zip(self._groups, distinct, strict=True)
        ]
        return self._fetch(requests)

    @staticmethod
    def _stale_mask(
        spec: FeatureSpec, group: _KeyGroup, replies: list[Any], now_ms: float, event_rows: np.ndarray
    ) -> np.ndarray | None:
        if spec.max_age_s is None:
            return None
        oldest_ms = now_ms - spec.max_age_s * 1000
        stamp_index = len(group.fields)
        stamps = np.full(len(replies) + 1, -math.inf)
        for i, reply in enumerate(replies):
            if reply is not None and reply[stamp_index] is not None:
                with contextlib.suppress(ValueError):  # an unreadable stamp cannot prove the values fresh
                    stamps[i] = float(reply[stamp_index])
        return stamps[event_rows] < oldest_ms

    @staticmethod
    def _parse_column(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
        """Floats of one column (NaN where missing); unparseable values give their row a reason."""
        kinds = set(map(type, raw))
        numeric = _NUMERIC_TYPES[spec.dtype]
        if kinds <= numeric:
            return np.array(raw, dtype=np.float64)
        if kinds <= numeric | {_NONE}:
            return np.array([math.nan if value is None else value for value in raw], dtype=np.float64)
        if kinds <= {bytes, _NONE} and spec.dtype in ("float32", "float64"):
            try:  # numpy parses the bytes of a whole column in C
                return np.array([b"nan" if value is None else value for value in raw], dtype=np.bytes_).astype(
                    np.float64
                )
            except ValueError:
                pass  # some value is not a number: find which, below
        parse = _PARSERS[spec.dtype]
        values = np.full(len(raw), math.nan)
        for row, value in enumerate(raw):
            if value is None:
                continue
            try:
                values[row] = parse(value)
            except (TypeError, ValueError):
                reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r} as {spec.dtype}")
        return values
