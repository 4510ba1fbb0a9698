"""Canary routing: a stable hash of the key picks the version; the share holds over many keys."""

from __future__ import annotations

from typing import cast

import numpy as np

from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.routing import Routing, canary_bucket


def _share(keys: list[str], share: float) -> np.ndarray:
    return np.array([canary_bucket(k) < round(share * 10_000) for k in keys])


def test_ten_percent_over_10k_keys_is_within_two_points() -> None:
    keys = [f"card-{i:06d}" for i in range(10_000)]
    observed = _share(keys, 0.10).mean()
    assert abs(observed - 0.10) <= 0.02, observed


def test_same_key_same_side_every_time_and_shares_nest() -> None:
    keys = [f"user-{i}" for i in range(2000)]
    assert (_share(keys, 0.1) == _share(list(keys), 0.1)).all()
    # Raising the share only moves keys onto the candidate, never back.
    assert (_share(keys, 0.1) <= _share(keys, 0.25)).all()
    assert canary_bucket("x") == canary_bucket("x")
    assert 0 <= canary_bucket("") < 10_000


def test_the_plan_gives_every_row_to_exactly_one_live_lane_and_shadow_rows_to_the_candidate() -> None:
    live, candidate = cast(OnnxModel, "live-model"), cast(OnnxModel, "candidate-model")  # lanes only carry them
    keys = [f"card-{i}" for i in range(1000)]
    asked: list[int] = []

    def keys_of() -> list[str]:
        asked.append(1)
        return keys

    (only,) = Routing(live).plan(len(keys), keys_of)
    assert (only.model, only.live, bool(only.rows.all())) == (live, True, True)
    (only,) = Routing(live, "canary", None, 0.3).plan(len(keys), keys_of)  # a canary with nothing loaded
    assert (only.model, bool(only.rows.all())) == (live, True)
    assert not asked, "keys are rendered only for a canary split"

    stay, move = Routing(live, "canary", candidate, 0.3).plan(len(keys), keys_of)
    assert (stay.model, move.model) == (live, candidate)
    assert (stay.live, move.live) == (True, True)
    assert (stay.rows ^ move.rows).all(), "each row in exactly one live lane"
    np.testing.assert_array_equal(move.rows, _share(keys, 0.3))
    assert 0.25 < move.rows.mean() < 0.35

    main, shadow = Routing(live, "shadow", candidate).plan(len(keys), keys_of)
    assert (main.model, main.live, bool(main.rows.all())) == (live, True, True)
    assert (shadow.model, shadow.live, bool(shadow.rows.all())) == (candidate, False, True)
