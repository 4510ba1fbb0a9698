"""Hash features from flat replies (features.Replies: keys x fields, errors by position) against a reference worked
out event by event: generated stores with numbers, text, NaN, infinities and absent fields, keys repeated or null,
keys whose read failed (their reply values are garbage and must be ignored), stamps fresh, stale or unreadable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.config import FeatureSpec
from streamserve.pipeline.features import FeatureBuilder, FeatureRequest, Replies
from streamserve.records import Event, Source

NOW_MS = 1_700_000_000_000.0
MAX_AGE_S = 60
SPECS = [
    FeatureSpec(name="a", source="redis", key="h:{id}", field="a", dtype="float64", default=-1.0),
    FeatureSpec(name="b", source="redis", key="h:{id}", field="b", dtype="float64"),  # no default
    FeatureSpec(name="d", source="redis", key="h:{id}", field="d", dtype="float64", default=2.0),
    FeatureSpec(
        name="c",
        source="redis",
        key="g:{other}",
        field="c",
        dtype="float64",
        default=0.5,
        max_age_s=MAX_AGE_S,
        updated_at_field="ts",
    ),
]
TEMPLATES = {"a": ("h", "id"), "b": ("h", "id"), "d": ("h", "id"), "c": ("g", "other")}
"""Groups of different widths (h: a, b, d; g: c and its stamp), so one group's stride cannot pass for the other's."""

numbers = st.floats(allow_nan=False, allow_infinity=False, width=64).map(lambda x: repr(x).encode())
odd = st.sampled_from([b"nan", b"inf", b"-inf", b"abc", b"", "ü".encode(), b"1e999"])
values = st.one_of(numbers, numbers, numbers, odd, st.none())  # None: the hash has no such field
stamps = st.one_of(
    st.floats(NOW_MS - 2 * MAX_AGE_S * 1000, NOW_MS + 1000).map(lambda x: repr(x).encode()),
    st.sampled_from([b"yesterday", None]),
)
hashes = st.fixed_dictionaries({"a": values, "b": values, "c": values, "d": values, "ts": stamps}).map(
    lambda fields: {name: value for name, value in fields.items() if value is not None}
)


class Store:
    """Hashes in a dict; `failing` keys answer with an error and garbage values, as a WRONGTYPE key would."""

    def __init__(self, hashes: dict[str, dict[str, bytes]], failing: set[str]) -> None:
        self.hashes, self.failing = hashes, failing

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        out = []
        for fields, keys in requests:
            assert fields is not None
            flat = [b"999" if key in self.failing else self.hashes.get(key, {}).get(f) for key in keys for f in fields]
            errors: dict[int, Exception] = {
                i: RuntimeError("WRONGTYPE") for i, k in enumerate(keys) if k in self.failing
            }
            out.append(Replies(flat, errors))
        return out


def parse(raw: bytes | None) -> tuple[float, str | None]:
    """(value, reason): NaN for missing, NaN and infinities; a reason when the bytes are not a number."""
    if raw is None:
        return math.nan, None
    try:
        number = float(raw)
    except ValueError:
        return math.nan, "cannot parse"
    return (number if math.isfinite(number) else math.nan), None


def reference(rows: list[dict[str, Any]], store: Store) -> tuple[dict[int, dict[str, float]], dict[int, str]]:
    """Per event, the values of a, b, c, d or the start of its rejection reason."""
    kept, rejected = {}, {}
    for i, fields in enumerate(rows):
        keys = {
            name: None if fields[field] is None else f"{prefix}:{fields[field]}"
            for name, (prefix, field) in TEMPLATES.items()
        }
        failed = [key for key in keys.values() if key in store.failing]
        if failed:
            rejected[i] = "Redis key"
            continue
        out, why = {}, None
        for spec in SPECS:
            entity = store.hashes.get(keys[spec.name] or "", {}) if keys[spec.name] else {}
            value, reason = parse(entity.get(spec.field))
            if reason and why is None:
                why = f"feature {spec.name!r}: {reason}"
            if spec.max_age_s is not None and not math.isnan(value):
                try:
                    fresh = float(entity.get("ts", b"")) >= NOW_MS - spec.max_age_s * 1000
                except ValueError:
                    fresh = False
                value = value if fresh else math.nan
            if math.isnan(value):
                if spec.default is None:
                    why = why or f"feature {spec.name!r}:"
                else:
                    value = float(spec.default)
            out[spec.name] = value
        if why is None:
            kept[i] = out
        else:
            rejected[i] = why
    return kept, rejected


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["h:0", "h:1", "h:2", "h:3", "g:x", "g:y", "g:z"]), hashes),
    st.sets(st.sampled_from(["h:1", "g:y", "h:9"])),
    st.lists(
        st.fixed_dictionaries(
            {"id": st.sampled_from([None, "0", "1", "2", "3", "9"]), "other": st.sampled_from([None, "x", "y", "z"])}
        ),
        max_size=40,
    ),
)
def test_flat_replies_build_what_each_event_would(
    stored: dict[str, dict[str, bytes]], failing: set[str], rows: list[dict[str, Any]]
) -> None:
    store = Store(stored, failing)
    events = [Event(Source("in", 0, i, None, b"", None, 0), fields) for i, fields in enumerate(rows)]
    batch = FeatureBuilder(SPECS, store, clock_ms=lambda: NOW_MS).build(events)
    kept, rejected = reference(rows, store)
    got = {r.source.offset: r.message for r in batch.rejected}
    assert got.keys() == rejected.keys()
    for offset, start in rejected.items():
        assert got[offset].startswith(start), (got[offset], start)
    assert [e.source.offset for e in batch.events] == list(kept)
    for name in ("a", "b", "c", "d"):
        np.testing.assert_array_equal(batch.columns[name], [kept[e.source.offset][name] for e in batch.events])
