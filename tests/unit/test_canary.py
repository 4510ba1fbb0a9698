"""Canary routing: a stable hash of the key picks the version; the share holds over many keys."""

from __future__ import annotations

import numpy as np

from streamserve.control.registry import canary_bucket


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
