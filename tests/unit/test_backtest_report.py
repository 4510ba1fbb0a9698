"""The backtest's positions and figures, without servers."""

from __future__ import annotations

import io

import fastavro
import numpy as np
import pytest

from streamserve.errors import ConfigError
from streamserve.ops.comparison import agreement, decode_labels, quality, quantiles, score_deltas
from streamserve.ops.history import parse_position
from streamserve.schemas import bundled

NOW = 1_700_000_000_000


def test_positions_an_operator_writes() -> None:
    assert parse_position("0:10,2:30", NOW).offsets == {0: 10, 2: 30}
    assert parse_position("-2h", NOW).time_ms == NOW - 2 * 3600 * 1000
    assert parse_position("-30m", NOW).time_ms == NOW - 30 * 60 * 1000
    assert parse_position("2023-11-14T22:13:20Z", NOW).time_ms == NOW
    assert parse_position("2023-11-14T22:13:20", NOW).time_ms == NOW  # no zone: UTC
    assert parse_position("beginning").edge == "beginning"
    assert parse_position("now", NOW).time_ms == NOW


@pytest.mark.parametrize("text", ["yesterday", "0:", "1:2:3", "-2w", ""])
def test_a_position_that_means_nothing_is_one_clear_error(text: str) -> None:
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_position(text, NOW)


def test_agreement_and_flips_equal_a_recount() -> None:
    rng = np.random.default_rng(5)
    live = [str(x) for x in rng.integers(0, 3, 500)]
    candidate = [str(x) if rng.random() < 0.8 else "2" for x in rng.integers(0, 3, 500)]
    found = agreement([*live, None], [*candidate, "1"])
    same = sum(a == b for a, b in zip(live, candidate, strict=True))
    assert (found["compared"], found["agree"], found["flips"]) == (500, same, 500 - same)
    assert found["rate"] == same / 500
    assert sum(sum(row.values()) for row in found["confusion"].values()) == 500
    assert found["confusion"]["0"].get("2", 0) == sum(
        a == "0" and b == "2" for a, b in zip(live, candidate, strict=True)
    )


def test_score_deltas_are_candidate_minus_live() -> None:
    found = score_deltas([0.1, 0.5, 0.9], [0.2, 0.5, 0.6])
    assert found["quantiles"]["min"] == pytest.approx(-0.3)
    assert found["quantiles"]["max"] == pytest.approx(0.1)
    assert found["mean"] == pytest.approx((0.1 + 0.0 - 0.3) / 3)
    assert quantiles([]) is None


def _label(event_id: str, label: object) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, bundled("label"), {"event_id": event_id, "label": label, "label_time": 1})
    return buffer.getvalue()


def test_quality_side_by_side_reads_labels_and_skips_garbage() -> None:
    labels, unreadable = decode_labels([_label("a", 1), _label("b", 0), b"\xff\xff garbage", None, _label("c", None)])
    assert labels == {"a": 1, "b": 0}
    assert unreadable >= 1
    assert quality(["a", "b", "z"], [0.9, 0.8, 0.1], ["1", "1", "0"], labels) == {"labelled": 2, "accuracy": 0.5}
    regressor = quality(["a", "b"], [0.5, 0.5], [None, None], labels)
    assert regressor == {"labelled": 2, "mae": pytest.approx(0.5)}
