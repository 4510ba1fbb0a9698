"""The monitor's bundles (many by-event records in one Kafka message) and its batch label decoding."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamserve.monitor import bundles, labels
from streamserve.monitor.bundles import Bundles


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60), st.integers(1, 16))
def test_every_record_lands_once_in_its_event_ids_partition(event_ids: list[str], partitions: int) -> None:
    grouped = Bundles(partitions)
    for i, event_id in enumerate(event_ids):
        grouped.add(event_id, {"k": "p", "n": i})
    seen = []
    for partition, value in grouped.encoded():
        for record in bundles.decode(value):
            expected = zlib.crc32(record["id"].encode("utf-8", "surrogatepass")) % partitions
            assert partition == expected
            seen.append(record["n"])
    assert sorted(seen) == list(range(len(event_ids)))
    assert grouped.count == len(event_ids)


def test_a_large_bundle_is_split_in_order_and_each_part_fits() -> None:
    grouped = Bundles(1)
    for i in range(400):
        grouped.add(f"e-{i}", {"pr": {f"class-{c}": 0.001 for c in range(200)}, "n": i})
    parts = list(grouped.encoded())
    assert len(parts) > 1
    assert all(len(value) <= bundles.MAX_BUNDLE_BYTES for _, value in parts)
    assert [r["n"] for _, value in parts for r in bundles.decode(value)] == list(range(400))


def test_positions_increase_with_the_offset_then_the_index() -> None:
    ordered = [bundles.position(offset, index) for offset in range(3) for index in (0, 1, bundles.SLOTS - 1)]
    assert ordered == sorted(ordered)
    assert len(set(ordered)) == len(ordered)


@pytest.mark.parametrize(
    "value",
    [None, b"", b"garbage", b'{"id": "x"}', json.dumps([{"k": "p"}]).encode(), json.dumps([1, 2]).encode()],
)
def test_a_value_that_is_no_bundle_is_refused(value: bytes | None) -> None:
    with pytest.raises(ValueError, match="by-event message"):
        bundles.decode(value)


def test_labels_read_in_a_batch_equal_labels_read_one_by_one() -> None:
    values: list[bytes | None] = [
        labels.encode("a", "1", 1000),
        labels.encode("b", 0, 2000),
        b"\x00\x01garbage",
        labels.encode("c", 0.5, 3000),  # a fraction for a classifier
        None,
        labels.encode("d", 1, 4000),
        labels.encode("e", "1", 5000) + b"\x00",  # trailing bytes
        labels.encode("", "1", 6000),  # no event id
    ]
    batch = labels.parse_many(values, "classification")
    for value, found in zip(values, batch, strict=True):
        try:
            alone: labels.Label | labels.BadLabel = labels.parse(value, "classification")
        except labels.BadLabel as exc:
            alone = exc
        if isinstance(alone, labels.BadLabel):
            assert isinstance(found, labels.BadLabel)
            assert found.reason == alone.reason
        else:
            assert found == alone
    assert [f.event_id for f in batch if isinstance(f, labels.Label)] == ["a", "b", "d"]
