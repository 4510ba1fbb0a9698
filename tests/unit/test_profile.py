"""Reference profiles and PSI with no servers: the figures equal a PSI computed here with numpy on the same bins,
a sample from the reference distribution does not drift, one shifted feature drifts alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamserve.config import FeatureSpec
from streamserve.errors import ConfigError
from streamserve.pipeline.profile import (
    MISSING,
    PSI_FLOOR,
    FeatureProfile,
    ReferenceProfile,
    build_profile,
    profile_feature,
    window_psi,
)

MODES = ["IDLE", "NORMAL", "PEAK"]
FEATURES = [
    FeatureSpec(name="temperature", source="event", field="t"),
    FeatureSpec(name="pressure", source="event", field="p", default=1.0),
    FeatureSpec(name="site", source="event", field="s", dtype="string", default="unknown"),
    FeatureSpec(name="mode", source="event", field="m", dtype="string", encoding="onehot", vocabulary=MODES),
    FeatureSpec(name="vibration", source="event", field="v", length=2),
]
SITES = ["north", "south", "harbor", "inland"]
SITE_SHARES = [0.4, 0.3, 0.2, 0.1]


def draw(
    rows: int, seed: int, temperature_shift: float = 0.0, site_shares: list[float] = SITE_SHARES
) -> dict[str, np.ndarray]:
    """Columns as the worker feeds them: missing pressures and sites already replaced by their defaults."""
    rng = np.random.default_rng(seed)
    pressure = rng.gamma(3.0, 2.0, rows)
    pressure[rng.random(rows) < 0.1] = 1.0  # missing, served as the default
    sites = rng.choice(SITES, rows, p=site_shares).astype(object)
    sites[rng.random(rows) < 0.05] = "unknown"
    mode = np.zeros((rows, len(MODES) + 1))
    mode[np.arange(rows), rng.choice(len(MODES) + 1, rows, p=[0.3, 0.5, 0.15, 0.05])] = 1.0
    return {
        "temperature": rng.normal(60.0, 8.0, rows) + temperature_shift,
        "pressure": pressure,
        "site": sites,
        "mode": mode,
        "vibration": rng.normal(0.0, 1.0, (rows, 2)),
    }


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    columns = draw(20_000, seed=1)
    scores = 1 / (1 + np.exp(-(columns["temperature"] - 60) / 8))
    return build_profile("pumps", "v3", FEATURES, columns, scores)


def stream_psi(profile: ReferenceProfile, columns: dict[str, np.ndarray]) -> dict[str, float]:
    scores = 1 / (1 + np.exp(-(columns["temperature"] - 60) / 8))
    counts = {entry.name: entry.counts(columns[entry.feature] if entry.feature else scores) for entry in profile.all()}
    return {name: value for name, (value, _) in window_psi(profile, counts).items()}


def numpy_psi(expected: tuple[float, ...], bins: np.ndarray, n_bins: int) -> float:
    """PSI computed here: shares per bin, floored, sum of (a - e) ln(a / e)."""
    actual = np.array([(bins == i).sum() for i in range(n_bins)], dtype=float) / len(bins)
    a, e = np.clip(actual, PSI_FLOOR, None), np.clip(np.array(expected), PSI_FLOOR, None)
    return float(np.sum((a - e) * np.log(a / e)))


def test_a_stream_from_the_reference_distribution_does_not_drift(profile: ReferenceProfile) -> None:
    found = stream_psi(profile, draw(5000, seed=2))
    assert set(found) == {"temperature", "pressure", "site", "mode", "vibration[0]", "vibration[1]", "score"}
    assert max(found.values()) < 0.1, found


def test_one_shifted_numeric_feature_drifts_alone(profile: ReferenceProfile) -> None:
    found = stream_psi(profile, draw(5000, seed=3, temperature_shift=12.0))
    drifted = {name for name, value in found.items() if value > 0.25}
    assert drifted == {"temperature", "score"}, found  # the score follows the temperature it is made of


def test_one_shifted_category_drifts_alone(profile: ReferenceProfile) -> None:
    found = stream_psi(profile, draw(5000, seed=4, site_shares=[0.1, 0.1, 0.2, 0.6]))
    assert {name for name, value in found.items() if value > 0.25} == {"site"}, found


def test_psi_equals_numpy_on_the_same_bins(profile: ReferenceProfile) -> None:
    columns = draw(3000, seed=5, temperature_shift=3.0, site_shares=[0.25, 0.25, 0.25, 0.25])
    found = stream_psi(profile, columns)
    entries = {entry.name: entry for entry in profile.all()}
    temperature = entries["temperature"]
    # numeric bins: (edge[i-1], edge[i]]: np.digitize with right=True
    bins = np.digitize(columns["temperature"], np.array(temperature.edges), right=True)
    assert found["temperature"] == pytest.approx(
        numpy_psi(temperature.expected, bins, len(temperature.expected)), abs=1e-12
    )
    pressure = entries["pressure"]
    values = columns["pressure"]
    bins = np.where(values == 1.0, len(pressure.edges) + 1, np.digitize(values, np.array(pressure.edges), right=True))
    assert found["pressure"] == pytest.approx(numpy_psi(pressure.expected, bins, len(pressure.expected)), abs=1e-12)
    site = entries["site"]
    names = site.bin_names()
    assert names[-1] == MISSING
    site_bins = np.array([len(names) - 1 if s == "unknown" else names.index(s) for s in columns["site"]])
    assert found["site"] == pytest.approx(numpy_psi(site.expected, site_bins, len(names)), abs=1e-12)
    mode = entries["mode"]
    assert found["mode"] == pytest.approx(numpy_psi(mode.expected, columns["mode"].argmax(axis=1), 5), abs=1e-12)


def test_the_missing_share_is_its_own_bin(profile: ReferenceProfile) -> None:
    pressure = next(entry for entry in profile.features if entry.name == "pressure")
    assert pressure.expected[-1] == pytest.approx(0.1, abs=0.01)  # 10% served as the default
    site = next(entry for entry in profile.features if entry.name == "site")
    assert site.expected[-1] == pytest.approx(0.05, abs=0.01)
    assert "unknown" not in site.categories


def test_the_profile_file_round_trips_and_garbage_is_refused(profile: ReferenceProfile) -> None:
    assert ReferenceProfile.from_bytes(profile.to_bytes()) == profile
    for garbage in (b"", b"{}", b"\xff\x00", b'{"format": "other"}', profile.to_bytes()[:-5]):
        with pytest.raises(ConfigError, match="not a reference profile"):
            ReferenceProfile.from_bytes(garbage)


@settings(max_examples=80, deadline=None)
@given(
    reference=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(-1e6, 1e6)),
    stream=hnp.arrays(np.float64, st.integers(1, 200), elements=st.floats(allow_nan=True, allow_infinity=True)),
    default=st.one_of(st.none(), st.floats(-10, 10)),
)
def test_any_number_lands_in_exactly_one_bin_missing_in_its_own(
    reference: np.ndarray, stream: np.ndarray, default: float | None
) -> None:
    spec = FeatureSpec(name="x", source="event", field="x", default=default)
    (entry,) = profile_feature(spec, reference)
    bins = entry.bins(stream)
    assert bins.shape == stream.shape
    assert ((bins >= 0) & (bins <= entry.value_bins)).all()
    missing = np.isnan(stream) | (stream == default if default is not None else False)
    assert ((bins == entry.value_bins) == missing).all()
    assert entry.counts(stream).sum() == len(stream)


@settings(max_examples=60, deadline=None)
@given(
    numbers=hnp.arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e3, 1e3)),
    texts=st.lists(st.sampled_from(["a", "b", "c", "", "zz"]), min_size=1, max_size=300),
)
def test_a_sample_against_its_own_profile_has_psi_zero(numbers: np.ndarray, texts: list[str]) -> None:
    specs = [
        FeatureSpec(name="n", source="event", field="n"),
        FeatureSpec(name="t", source="event", field="t", dtype="string"),
    ]
    rows = min(len(numbers), len(texts))
    columns = {"n": numbers[:rows], "t": np.array(texts[:rows], dtype=object)}
    built = build_profile("m", "v", specs, columns, numbers[:rows])
    counts = {e.name: e.counts(columns[e.feature] if e.feature else numbers[:rows]) for e in built.all()}
    for value, _ in window_psi(built, counts).values():
        assert math.isclose(value, 0.0, abs_tol=1e-12)


def test_an_unknown_vocabulary_column_counts_as_other() -> None:
    spec = FeatureSpec(name="m", source="event", field="m", dtype="string", encoding="ordinal", vocabulary=MODES)
    (entry,) = profile_feature(spec, np.array([0.0, 1.0, 2.0, 3.0]))
    assert entry.kind == "code"
    assert entry.bins(np.array([0.0, 3.0, 7.0, -1.0, np.nan])).tolist() == [0, 3, 3, 3, 4]  # NaN: missing
    assert isinstance(entry, FeatureProfile)
