"""From decoded events to what each entity's aggregates take: entity key, event time, one value per aggregate.

An event feeds every aggregate it can. Whatever it cannot feed (no event time, a null key field, a null or
non-numeric aggregated field) is a reason; an event with a reason is dead-lettered once, with all its reasons,
and counted per reason. Nothing here raises on a record's content.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamserve.config import AggregateSpec, PipelineSettings
from streamserve.errors import ConfigError
from streamserve.pipeline.features.keys import KeyRenderer
from streamserve.pipeline.fields import SCALAR_KINDS, epoch_ms, getter, resolve, text_getter, to_number, to_text
from streamserve.records import Event
from streamserve.streaming.windows import NUMERIC_FUNCTIONS, Aggregate, Window


@dataclass(frozen=True, slots=True)
class Contribution:
    """One event's share of one entity: the values it gives that entity's aggregates (name -> value)."""

    key: str
    partition: int
    offset: int
    time_ms: int
    values: dict[str, Any]


@dataclass(slots=True)
class Extracted:
    """A batch's contributions, its events that could not feed everything (with why), and reason counts."""

    contributions: list[Contribution] = field(default_factory=list)
    rejected: list[tuple[Event, list[str]]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)


def _reader(spec: AggregateSpec, schema: Any) -> Callable[[dict[str, Any]], Any]:
    """Reads an aggregate's value from an event: None for count, a finite float or a text; ValueError otherwise."""
    if spec.function == "count":
        return lambda fields: None
    get = text_getter(spec.field or "", schema) if spec.function == "distinct_count" else getter(spec.field or "")

    def read(fields: dict[str, Any]) -> Any:
        raw = get(fields)
        if raw is None:
            raise ValueError(f"field {spec.field!r} is null or missing")
        if spec.function == "distinct_count":
            return to_text(raw)
        number = to_number(raw)
        if not math.isfinite(number):
            raise ValueError(f"field {spec.field!r} is {number}, not a finite number")
        return number

    return read


@dataclass(frozen=True)
class EntityGroup:
    """The aggregates that share one entity key template (one Redis entry per entity)."""

    template: str
    layout: str
    renderer: KeyRenderer
    aggregates: dict[str, Aggregate]
    readers: dict[str, Callable[[dict[str, Any]], Any]]
    indexes: dict[str, int]


def entity_groups(settings: PipelineSettings, schema: Any) -> list[EntityGroup]:
    """The configured aggregates grouped by key template, each field checked against the event schema."""
    by_template: dict[str, list[AggregateSpec]] = {}
    for spec in settings.stream_features.aggregates:
        check_key(spec, settings.input.key_field)
        check_field(spec, schema)
        by_template.setdefault(spec.key, []).append(spec)
    return [
        EntityGroup(
            template,
            specs[0].layout,
            KeyRenderer(template, schema),
            {s.name: Aggregate(s.name, s.function, Window(s.window_ms, s.hop_ms)) for s in specs},
            {s.name: _reader(s, schema) for s in specs},
            {s.name: s.index for s in specs if s.index is not None},
        )
        for template, specs in by_template.items()
    ]


def check_key(spec: AggregateSpec, key_field: str) -> None:
    """Refuse a key template not filled from the input's key field alone: the input is partitioned by that field,
    so such an entity lives in one partition and is written by one app (one writer per key)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(spec.key) if name}
    if fields != {key_field}:
        raise ConfigError(
            f"stream_features aggregate {spec.name!r}: key {spec.key!r} must be filled from input.key_field "
            f"{key_field!r} alone (the input is partitioned by it: one partition, hence one writer, per entity)"
        )


def check_field(spec: AggregateSpec, schema: Any) -> None:
    """Refuse, before the first record, an aggregated field the event schema does not have or cannot give."""
    if spec.field is None:
        return
    found = resolve(schema, spec.field)
    if found.kind not in SCALAR_KINDS:
        raise ConfigError(f"stream_features aggregate {spec.name!r}: field {spec.field!r} is an Avro {found.kind}")
    if spec.function in NUMERIC_FUNCTIONS and not found.numeric and found.kind != "string":
        raise ConfigError(
            f"stream_features aggregate {spec.name!r}: {spec.function} needs a number, field {spec.field!r} is an "
            f"Avro {found.kind} (distinct_count takes any value)"
        )


class Extractor:
    """Turns a batch of decoded events into contributions per entity key, and reasons for what it cannot use."""

    def __init__(self, groups: Sequence[EntityGroup], event_time_field: str | None) -> None:
        self.groups = list(groups)
        self._event_time = getter(event_time_field) if event_time_field else None
        self._time_name = event_time_field

    def time_of(self, event: Event) -> int:
        """The event time in epoch ms (the Kafka timestamp without an event-time field); ValueError when null."""
        if self._event_time is None:
            return event.source.timestamp_ms
        moment = epoch_ms(self._event_time(event.fields))
        if moment is None:
            raise ValueError(f"event time {self._time_name!r} is null")
        return moment

    def __call__(self, events: Sequence[Event]) -> Extracted:
        """Contributions of the events, in their order, and the events with reasons."""
        out = Extracted()
        times: list[int | None] = []
        reasons: list[list[str]] = [[] for _ in events]
        for i, event in enumerate(events):
            try:
                times.append(self.time_of(event))
            except (TypeError, ValueError) as exc:
                times.append(None)
                reasons[i].append(str(exc))
        everything = [event.fields for event in events]
        for group in self.groups:
            keys = group.renderer.keys(events, everything)
            for i, event in enumerate(events):
                moment = times[i]
                if moment is None:
                    continue
                key = keys[i]
                if key is None:
                    reasons[i].append(f"entity key {group.template!r} has a null or missing field")
                    continue
                values = self._values(group, event, reasons[i])
                if values:
                    out.contributions.append(
                        Contribution(key, event.source.partition, event.source.offset, moment, values)
                    )
        for event, why in zip(events, reasons, strict=True):
            if why:
                out.rejected.append((event, why))
                out.reasons.update(_reason_kind(reason) for reason in why)
        return out

    @staticmethod
    def _values(group: EntityGroup, event: Event, reasons: list[str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, read in group.readers.items():
            try:
                values[name] = read(event.fields)
            except (TypeError, ValueError) as exc:  # a record's content: a reason, never a crash
                reasons.append(f"aggregate {name!r}: {exc}")
        return values


def _reason_kind(reason: str) -> str:
    """A short label for counting reasons (the message without its values)."""
    if reason.startswith("event time"):
        return "no_event_time"
    if reason.startswith("entity key"):
        return "no_entity_key"
    if "null or missing" in reason:
        return "missing_field"
    return "bad_value"
