"""Feature building: column order, dtypes, defaults, staleness, rejections, one fetch per batch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.config import FeatureSpec
from streamserve.pipeline.features import FeatureBuilder, Replies
from streamserve.records import Event, Source

NOW_MS = 1_800_000_000_000.0


def event(offset: int, **fields: Any) -> Event:
    return Event(Source("in", 0, offset, None, b"", None, 0), fields)


class HashStore:
    """Hashes held in a dict, answering the builder's batched lookups and counting the round trips."""

    def __init__(self, hashes: dict[str, dict[str, Any]]) -> None:
        self.hashes = hashes
        self.round_trips: list[Sequence[tuple[list[str], list[str]]]] = []

    def __call__(self, requests: Sequence[tuple[list[str], list[str]]]) -> list[Replies]:
        self.round_trips.append(requests)
        return [Replies([self.hashes.get(key, {}).get(f) for key in keys for f in fields]) for fields, keys in requests]


SPECS = [
    FeatureSpec(name="amount", source="event", field="amount"),
    FeatureSpec(name="online", source="event", field="is_online", dtype="bool"),
    FeatureSpec(
        name="avg",
        source="redis",
        key="card:{card_id}",
        field="avg",
        default=50.0,
        max_age_s=60,
        updated_at_field="updated_at",
    ),
    FeatureSpec(name="count", source="redis", key="card:{card_id}", field="count", dtype="int64"),
    FeatureSpec(name="risk", source="redis", key="merchant:{merchant_id}", field="risk", default=0.5),
]


def test_matrix_in_spec_order_with_dtypes_and_defaults() -> None:
    store = HashStore(
        {
            "card:a": {"avg": b"10.5", "count": b"3", "updated_at": str(NOW_MS - 1000).encode()},
            "card:b": {"avg": b"20.0", "count": b"7", "updated_at": str(NOW_MS - 120_000).encode()},  # stale
            "merchant:m1": {"risk": b"0.25"},
        }
    )
    builder = FeatureBuilder(SPECS, store, clock_ms=lambda: NOW_MS)
    events = [
        event(0, amount=1.5, is_online=True, card_id="a", merchant_id="m1"),
        event(1, amount=2.0, is_online=False, card_id="b", merchant_id="m2"),  # merchant missing -> default
        event(2, amount=3.0, is_online=True, card_id="a", merchant_id="m1"),
    ]
    batch = builder.build(events)
    assert batch.matrix.dtype == np.float32
    np.testing.assert_array_equal(
        batch.matrix,
        np.array([[1.5, 1, 10.5, 3, 0.25], [2.0, 0, 50.0, 7, 0.5], [3.0, 1, 10.5, 3, 0.25]], dtype=np.float32),
    )
    assert batch.stale_defaults == 1
    assert batch.missing_defaults == 1
    assert not batch.rejected
    assert len(store.round_trips) == 1, "one round trip per batch"
    assert store.round_trips[0][0][1] == ["card:a", "card:b"], "each distinct key is fetched once"


def test_missing_value_without_default_rejects_only_that_event() -> None:
    store = HashStore({"card:a": {"avg": b"1", "count": b"1", "updated_at": str(NOW_MS).encode()}})
    builder = FeatureBuilder(SPECS, store, clock_ms=lambda: NOW_MS)
    batch = builder.build(
        [
            event(0, amount=1.0, is_online=True, card_id="a", merchant_id="m"),
            event(1, amount=1.0, is_online=True, card_id="zzz", merchant_id="m"),  # no hash: count has no default
            event(2, amount=math.nan, is_online=True, card_id="a", merchant_id="m"),  # NaN, no default
            event(3, amount=1.0, is_online=True, card_id=None, merchant_id="m"),  # null key: no entity
        ]
    )
    assert [e.source.offset for e in batch.events] == [0]
    assert batch.matrix.shape == (1, 5)
    reasons = {r.source.offset: r.message for r in batch.rejected}
    assert set(reasons) == {1, 2, 3}
    assert "'count'" in reasons[1]
    assert "'amount'" in reasons[2]
    assert "'count'" in reasons[3]
    assert "missing" in reasons[3]
    assert all(r.stage == "features" for r in batch.rejected)


def test_unparseable_value_is_rejected_with_its_value() -> None:
    builder = FeatureBuilder([FeatureSpec(name="n", source="event", field="n", dtype="int64")], None)
    batch = builder.build([event(0, n=4), event(1, n="four")])
    np.testing.assert_array_equal(batch.matrix, np.array([[4.0]], dtype=np.float32))
    assert "'four'" in batch.rejected[0].message


def test_redis_features_need_a_fetcher() -> None:
    with pytest.raises(ValueError, match="fetcher"):
        FeatureBuilder(SPECS, None)


def test_feature_spec_validation() -> None:
    with pytest.raises(ValueError, match="key template"):
        FeatureSpec(name="x", source="redis", field="x")
    with pytest.raises(ValueError, match="updated_at_field"):
        FeatureSpec(name="x", source="event", field="x", max_age_s=5)


STAMPS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: repr(x).encode()),
    st.integers(-(2**63), 2**63).map(lambda x: str(x).encode()),
    st.binary(max_size=12),
    st.text(max_size=8),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(STAMPS, min_size=1, max_size=12))
def test_staleness_of_any_stamps_is_what_float_of_each_says(stamps: list[Any]) -> None:
    """Stamps are parsed for the whole batch at once; whatever they hold, each event is stale exactly when
    float() of its stamp reads a time older than max_age_s (an unreadable or missing stamp proves nothing)."""
    spec = FeatureSpec(
        name="avg", source="redis", key="card:{card_id}", field="avg", default=-1.0, max_age_s=60,
        updated_at_field="updated_at",
    )  # fmt: skip
    hashes = {f"card:{i}": {"avg": b"1.0", "updated_at": stamp} for i, stamp in enumerate(stamps)}
    builder = FeatureBuilder([spec], HashStore(hashes), clock_ms=lambda: NOW_MS)
    batch = builder.build([event(i, card_id=str(i)) for i in range(len(stamps))])

    def stale(stamp: Any) -> bool:
        try:
            return stamp is not None and float(stamp) < NOW_MS - 60_000
        except (TypeError, ValueError):
            return True  # cannot prove the value fresh

    expected = [-1.0 if stale(stamp) or stamp is None else 1.0 for stamp in stamps]
    assert batch.columns["avg"].tolist() == expected
