"""FeatureBuilder: a batch's event fields plus Redis entities as model input columns, one round trip per batch.

Redis features that share a key template form a key group: one command per group and one round trip per batch
(see features.redis). A group's reply stays one flat list (keys x fields), read a field at a time by slicing;
values are parsed once per distinct key, a column at a time, and the columns are assembled with numpy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np

from streamserve.config import FeatureSpec
from streamserve.errors import EnrichError, FeatureError
from streamserve.pipeline.features.columns import BatchInputs, ColumnBuilder, column_builder
from streamserve.pipeline.features.keys import KeyRenderer, distinct
from streamserve.pipeline.features.replies import (
    FeatureRequest,
    FetchFeatures,
    PendingReplies,
    Replies,
    StartFetch,
)
from streamserve.pipeline.features.values import unpack_vectors
from streamserve.records import Event, FeatureBatch, Rejected


class LookupObserver(Protocol):
    """Told how long each batch waited for its Redis replies, and what they were (feature ages)."""

    def replies_read(self, requests: Sequence[FeatureRequest], replies: list[Replies], seconds: float) -> None: ...


class _Unobserved:
    def replies_read(self, requests: Sequence[FeatureRequest], replies: list[Replies], seconds: float) -> None:
        """Nothing to record."""


@dataclass(frozen=True, slots=True)
class _KeyGroup:
    """Redis features that share a key template: one HMGET per distinct key, or one MGET (packed)."""

    template: str
    fields: tuple[str, ...]
    updated_at_field: str | None
    packed: bool = False
    width: int = 0
    """Elements of the packed vector the features use (largest index + 1)."""

    @property
    def requested(self) -> list[str] | None:
        """The hash fields read for each key (the update stamp last); None for packed vectors."""
        if self.packed:
            return None
        return [*self.fields, *([self.updated_at_field] if self.updated_at_field else [])]


@dataclass(frozen=True, slots=True)
class Lookup:
    """A batch's Redis lookup (FeatureBuilder.start_lookup): each event's key per group, and the replies coming."""

    events: Sequence[Event]
    keys_per_group: list[list[str | None]]
    distinct: list[list[str]]
    replies: PendingReplies


class FeatureBuilder:
    """Builds each feature's column for a batch of events: numbers as float64, categories as text or codes.

    A feature that cannot be built for an event (null or missing without a default, NaN or an infinity in an
    event field, a value that does not parse or does not fit its dtype, an array of the wrong length) rejects
    that event with a reason; the others go on.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        fetch: FetchFeatures | None,
        clock_ms: Callable[[], float] = lambda: time.time() * 1000,
        event_schema: Any | None = None,
        start_fetch: StartFetch | None = None,
        observer: LookupObserver | None = None,
    ) -> None:
        """``event_schema`` (JSON form): timestamp-millis key fields and categories render as datetimes.
        ``start_fetch`` sends a lookup ahead (None: start_lookup defers the call to build()); ``observer`` is
        told of each batch's Redis replies."""
        self.features = list(features)
        self.fetch = fetch
        self.start_fetch = start_fetch
        self._observer: LookupObserver = observer or _Unobserved()
        self._clock_ms = clock_ms
        self._groups = _key_groups(self.features)
        if self._groups and fetch is None:
            raise ValueError("Redis features need a Redis fetcher")
        self._requested = [group.requested for group in self._groups]
        self._widths = [1 if fields is None else len(fields) for fields in self._requested]
        """Values per key in each group's reply: the fields read (hashes), or the one vector (packed)."""
        self._renderers = [KeyRenderer(group.template, event_schema) for group in self._groups]
        self._columns = [self._column_builder(spec, event_schema) for spec in self.features]

    @property
    def width(self) -> int:
        """Number of model input columns per event, over all features."""
        return sum(spec.width for spec in self.features)

    @property
    def reads_redis(self) -> bool:
        """Some features come from Redis (a batch's round trip can be started ahead: start_lookup)."""
        return bool(self._groups)

    def start_lookup(self, events: Sequence[Event]) -> Lookup:
        """Send the events' Redis lookup now; build(events, pending=...) reads its replies.

        The worker starts the next batch's lookup before it scores the current batch, so that Redis works
        through its keys while this batch is scored, encoded and produced, instead of the loop waiting for it.
        The values are read that much earlier; freshness is judged when the batch is built.
        """
        keys_per_group = self._render_keys(events)
        distinct_keys = [distinct(keys) for keys in keys_per_group]
        requests = list(zip(self._requested, distinct_keys, strict=True))
        assert self.fetch is not None
        start = self.start_fetch or partial(PendingReplies.deferred, self.fetch)
        return Lookup(events, keys_per_group, distinct_keys, start(requests))

    def build(
        self, events: Sequence[Event], redis_available: bool = True, pending: Lookup | None = None
    ) -> FeatureBatch:
        """Columns for the events whose features could be built; the others are rejected with a reason.

        With ``redis_available=False`` every Redis feature takes its default and the batch is flagged
        degraded (the ``defaults`` policy for feature-store outages). ``pending``: the lookup start_lookup()
        sent for these same events (the very list); its replies are read here, its errors raised here.
        """
        if pending is not None and (pending.events is not events or not redis_available):
            pending.replies.cancel()
            pending = None
        if pending is not None:
            keys_per_group, distinct_keys = pending.keys_per_group, pending.distinct
        else:
            keys_per_group = self._render_keys(events)
            distinct_keys = [distinct(keys) for keys in keys_per_group]
        degraded = bool(self._groups) and not redis_available
        replies = self._replies(distinct_keys, pending, degraded)
        batch = self._inputs(events, keys_per_group, distinct_keys, replies)
        columns = {column.name: column.build(batch) for column in self._columns}
        return _feature_batch(events, columns, batch, degraded)

    def _replies(self, distinct_keys: list[list[str]], lookup: Lookup | None, degraded: bool) -> list[Replies]:
        """Each group's replies: read from the lookup sent ahead, fetched now, or none (degraded, no groups)."""
        if degraded or not self._groups:
            return [Replies([None] * (len(keys) * w)) for keys, w in zip(distinct_keys, self._widths, strict=True)]
        if lookup is not None:
            coming = lookup.replies
        else:
            assert self.fetch is not None
            coming = PendingReplies.deferred(self.fetch, list(zip(self._requested, distinct_keys, strict=True)))
        started = time.perf_counter_ns()
        replies = coming.result()
        self._observer.replies_read(coming.requests, replies, (time.perf_counter_ns() - started) / 1e9)
        return replies

    def _inputs(
        self,
        events: Sequence[Event],
        keys_per_group: list[list[str | None]],
        distinct_keys: list[list[str]],
        lookups: list[Replies],
    ) -> BatchInputs:
        """The inputs of the column builders: per group each event's row and the reply values; the events of
        keys whose read failed get their reason."""
        n = len(events)
        reasons: dict[int, str] = {}
        rows, replies = [], []
        for g, (keys, group_keys, lookup) in enumerate(zip(keys_per_group, distinct_keys, lookups, strict=True)):
            width = self._widths[g]
            # Each event's row among the distinct keys (the extra last row stands for "no entity": a null key).
            position: dict[str | None, int] = {key: i for i, key in enumerate(group_keys)}
            position[None] = len(group_keys)
            rows.append(np.fromiter(map(position.__getitem__, keys), dtype=np.intp, count=n))
            replies.append(self._checked(g, lookup, group_keys, width, rows[g], reasons))
        vectors = [
            unpack_vectors(values, group.width) if group.packed else None
            for group, values in zip(self._groups, replies, strict=True)
        ]
        everything = [event.fields for event in events]
        return BatchInputs(everything, rows, replies, vectors, self._clock_ms(), reasons)

    def _checked(
        self, g: int, lookup: Replies, group_keys: list[str], width: int, rows: np.ndarray, reasons: dict[int, str]
    ) -> list[Any]:
        """A group's reply values, those of keys whose read failed blanked (their events get the error)."""
        got = lookup.values
        if len(got) != len(group_keys) * width:
            raise EnrichError(  # the fetcher broke its contract (a bug, not an outage); no record is at fault
                f"feature fetcher bug: {len(got)} values for {len(group_keys)} keys x {width} fields "
                f"of {self._groups[g].template!r}"
            )
        if lookup.errors:  # a Redis error for a key (WRONGTYPE...) rejects its events
            got = list(got)
            for i, error in lookup.errors.items():
                got[i * width : (i + 1) * width] = [None] * width
                for row in np.flatnonzero(rows == i):
                    reasons.setdefault(int(row), f"Redis key {group_keys[i]!r}: {error}")
        return got

    def _render_keys(self, events: Sequence[Event]) -> list[list[str | None]]:
        """Per group, the Redis key of each event (None when a key field is null: no entity)."""
        everything = [event.fields for event in events]
        return [renderer.keys(events, everything) for renderer in self._renderers]

    def _column_builder(self, spec: FeatureSpec, event_schema: Any) -> ColumnBuilder:
        """The column builder of a feature, with its key group's place in the replies when it reads Redis."""
        if spec.source != "redis":
            return column_builder(spec, -1, None, 0, event_schema)
        g = next(g for g, group in enumerate(self._groups) if group.template == (spec.key or ""))
        return column_builder(spec, g, self._requested[g], self._widths[g], event_schema)


def _key_groups(features: list[FeatureSpec]) -> list[_KeyGroup]:
    """The Redis features grouped by key template, in order of first appearance."""
    groups: dict[str, list[FeatureSpec]] = {}
    for spec in features:
        if spec.source == "redis":
            groups.setdefault(spec.key or "", []).append(spec)
    found = []
    for template, specs in groups.items():
        layouts = {spec.layout for spec in specs}
        if len(layouts) > 1:
            raise ValueError(f"features of key {template!r} mix layouts {sorted(layouts)}")
        packed = layouts == {"packed"}
        found.append(
            _KeyGroup(
                template=template,
                fields=() if packed else tuple(dict.fromkeys(spec.field for spec in specs)),
                updated_at_field=next((s.updated_at_field for s in specs if s.updated_at_field), None),
                packed=packed,
                width=max((spec.index or 0) + 1 for spec in specs) if packed else 0,
            )
        )
    return found


def _feature_batch(
    events: Sequence[Event], columns: dict[str, np.ndarray], batch: BatchInputs, degraded: bool
) -> FeatureBatch:
    """The batch of the events whose features were built; the others rejected with their reason."""
    reasons = batch.reasons
    if not reasons:
        return FeatureBatch(list(events), columns, batch.missing_defaults, batch.stale_defaults, degraded)
    keep = np.array([row for row in range(len(events)) if row not in reasons], dtype=np.intp)
    return FeatureBatch(
        events=[events[row] for row in keep],
        columns={name: column[keep] for name, column in columns.items()},
        missing_defaults=batch.missing_defaults,
        stale_defaults=batch.stale_defaults,
        degraded=degraded,
        rejected=[
            Rejected(events[row].source, FeatureError.stage, FeatureError.__name__, reason)
            for row, reason in sorted(reasons.items())
        ],
    )
