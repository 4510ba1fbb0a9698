"""Reference profiles and the population stability index (PSI): what "drift" is measured against.

A profile describes one model version's inputs as they were fed to it (the columns ``FeatureBuilder`` builds,
the feature log's form) and its score over a reference sample: per numeric feature, quantile bins; per text
feature, the frequencies of its most common categories and one bin for the others; per vocabulary-encoded
feature, one bin per vocabulary entry and one for the unknown column; per vector feature, each element as a
numeric feature (``name[i]``). Every feature has a last bin for missing values, which in served columns are the
feature's default: a value equal to the default counts as missing, so the reference and the stream agree.

PSI = sum over bins of (actual - expected) * ln(actual / expected), each share floored at PSI_FLOOR so an empty
bin counts as a small share rather than an infinite one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from typing import Any, Literal

import numpy as np

from streamserve.config import FeatureSpec
from streamserve.errors import ConfigError

PROFILE_FORMAT = "streamserve.reference-profile.v1"
QUANTILE_BINS = 10
"""Numeric bins between the reference's deciles (fewer when values repeat)."""
MAX_CATEGORIES = 20
"""Text categories with their own bin; the others share one."""
PSI_FLOOR = 1e-4
"""A bin's share is at least this in the PSI (an empty bin would make it infinite)."""
MISSING = "(missing)"
OTHER = "(other)"
SCORE = "score"
"""The profile entry of the model's score (a feature may not take this name's place: it is not a feature)."""

Kind = Literal["numeric", "category", "code"]


@dataclass(frozen=True)
class FeatureProfile:
    """One profiled quantity's bins and their reference shares (the missing bin last)."""

    name: str
    kind: Kind
    """numeric: value bins between ``edges``; category: one bin per ``categories`` entry and OTHER; code: the
    index of a vocabulary-encoded feature (ordinal value or one-hot column), one bin per index."""
    expected: tuple[float, ...]
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    default: float | str | None = None
    """The value served in place of a missing one: it lands in the missing bin."""
    default_code: int | None = None
    """kind code: the index of the default category (its bin is the missing bin)."""
    feature: str | None = None
    """The feature column it reads (None: the score); ``element`` picks a vector's column."""
    element: int | None = None

    @property
    def value_bins(self) -> int:
        """Bins before the missing bin."""
        if self.kind == "numeric":
            return len(self.edges) + 1
        return len(self.categories) + (1 if self.kind == "category" else 0)

    def bin_names(self) -> list[str]:
        """A readable name per bin, in order (the missing bin last)."""
        if self.kind == "numeric":
            bounds = ["-inf", *(f"{edge:.6g}" for edge in self.edges), "inf"]
            names = [f"({low}, {high}]" for low, high in pairwise(bounds)]
        elif self.kind == "category":
            names = [*self.categories, OTHER]
        else:
            names = list(self.categories)
        return [*names, MISSING]

    def bins(self, column: np.ndarray) -> np.ndarray:
        """The bin of each value of a served column (rows,) or (rows, width): exactly one per row."""
        if self.element is not None:
            column = column[:, self.element]
        if self.kind == "numeric":
            values = np.asarray(column, dtype=np.float64)
            found = np.searchsorted(np.asarray(self.edges, dtype=np.float64), values, side="left")
            missing = np.isnan(values)
            if isinstance(self.default, (int, float)):
                missing |= values == self.default
            return np.where(missing, self.value_bins, found)
        if self.kind == "code":
            if column.ndim == 2:
                absent = np.isnan(column).any(axis=1)
                codes = np.argmax(np.nan_to_num(column, nan=0.0), axis=1)
            else:
                values = np.asarray(column, dtype=np.float64)
                absent = np.isnan(values)
                codes = np.nan_to_num(values, nan=0.0).astype(np.int64)
            known = (codes >= 0) & (codes < self.value_bins)
            found = np.where(known, codes, self.value_bins - 1)  # out of range: the unknown column
            if self.default_code is not None:
                found = np.where(found == self.default_code, self.value_bins, found)
            return np.where(absent, self.value_bins, found)
        lookup = {category: i for i, category in enumerate(self.categories)}
        other, missing_bin = len(self.categories), self.value_bins
        if isinstance(self.default, str):
            lookup[self.default] = missing_bin
        return np.fromiter(
            (missing_bin if value is None or value == "" else lookup.get(value, other) for value in column.tolist()),
            dtype=np.int64,
            count=len(column),
        )

    def counts(self, column: np.ndarray) -> np.ndarray:
        """How many values of the column fall in each bin."""
        return np.bincount(self.bins(column), minlength=self.value_bins + 1)


def psi(expected: Sequence[float] | np.ndarray, counts: np.ndarray) -> tuple[float, np.ndarray]:
    """The PSI of observed bin counts against expected shares, and each bin's contribution to it."""
    total = counts.sum()
    if total == 0:
        return 0.0, np.zeros(len(counts))
    actual = np.maximum(counts / total, PSI_FLOOR)
    reference = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    contributions = (actual - reference) * np.log(actual / reference)
    return float(contributions.sum()), contributions


@dataclass(frozen=True)
class ReferenceProfile:
    """The profile of one model version's inputs and score over a reference sample."""

    model: str
    version: str
    rows: int
    features: tuple[FeatureProfile, ...]
    score: FeatureProfile | None

    def all(self) -> tuple[FeatureProfile, ...]:
        """The features' profiles, then the score's."""
        return (*self.features, *((self.score,) if self.score is not None else ()))

    def to_bytes(self) -> bytes:
        """The profile file's bytes (sorted JSON: the same profile always gives the same digest)."""
        body = {"format": PROFILE_FORMAT, **asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceProfile:
        """Read a profile file; ConfigError (one line) for anything that is not one."""
        try:
            body = json.loads(data)
            if body.pop("format") != PROFILE_FORMAT:
                raise ValueError("unknown format")
            entries = [FeatureProfile(**_tupled(entry)) for entry in body.pop("features")]
            score = body.pop("score")
            return cls(
                features=tuple(entries), score=None if score is None else FeatureProfile(**_tupled(score)), **body
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ConfigError(f"not a reference profile ({PROFILE_FORMAT}): {type(exc).__name__}: {exc}") from exc


def _tupled(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in entry.items()}


def profile_feature(spec: FeatureSpec, column: np.ndarray) -> list[FeatureProfile]:
    """The profile(s) of one feature from its reference column, as served (missing values as the default, or
    NaN/None)."""
    if spec.encoding != "none":
        vocabulary = tuple(spec.vocabulary or ())
        categories = (*vocabulary, OTHER)
        default_code = None
        if isinstance(spec.default, str):
            default_code = vocabulary.index(spec.default) if spec.default in vocabulary else len(vocabulary)
        entry = FeatureProfile(
            spec.name, "code", (), categories=categories, default_code=default_code, feature=spec.name
        )
        return [_with_shares(entry, column)]
    if spec.text:
        known = Counter(
            value for value in column.tolist() if value is not None and value != "" and value != spec.default
        )
        categories = tuple(sorted(category for category, _ in known.most_common(MAX_CATEGORIES)))
        entry = FeatureProfile(
            spec.name, "category", (), categories=categories, default=spec.default, feature=spec.name
        )
        return [_with_shares(entry, column)]
    if column.ndim == 2:
        return [_numeric(f"{spec.name}[{i}]", column[:, i], spec.default, spec.name, i) for i in range(column.shape[1])]
    return [_numeric(spec.name, column, spec.default, spec.name, None)]


def _numeric(
    name: str, values: np.ndarray, default: float | str | None, feature: str | None, element: int | None
) -> FeatureProfile:
    """Decile bins of one numeric quantity (1-D values), missing and default values apart."""
    numbers = np.asarray(values, dtype=np.float64)
    present = numbers[~np.isnan(numbers)]
    if isinstance(default, (int, float)):
        present = present[present != default]
    edges: tuple[float, ...] = ()
    if len(present):
        quantiles = np.quantile(present, np.linspace(0, 1, QUANTILE_BINS + 1)[1:-1])
        edges = tuple(float(edge) for edge in np.unique(quantiles))
    entry = FeatureProfile(name, "numeric", (), edges=edges, default=default, feature=feature)
    return replace(_with_shares(entry, numbers), element=element)


def _with_shares(entry: FeatureProfile, column: np.ndarray) -> FeatureProfile:
    counts = entry.counts(column)
    total = max(int(counts.sum()), 1)
    return replace(entry, expected=tuple(float(count) / total for count in counts))


def build_profile(
    model: str,
    version: str,
    features: Sequence[FeatureSpec],
    columns: Mapping[str, np.ndarray],
    scores: np.ndarray | None,
) -> ReferenceProfile:
    """A profile from reference columns as served (one per feature name) and the model's scores on them."""
    missing = [spec.name for spec in features if spec.name not in columns]
    if missing:
        raise ConfigError(f"the reference sample has no column for features {missing}")
    rows = len(next(iter(columns.values()))) if columns else 0
    if rows == 0:
        raise ConfigError("the reference sample has no rows")
    entries = [entry for spec in features for entry in profile_feature(spec, columns[spec.name])]
    score = None
    if scores is not None and len(scores):
        score = _numeric(SCORE, scores, None, None, None)
    return ReferenceProfile(model, version, rows, tuple(entries), score)


def window_psi(
    profile: ReferenceProfile, counts: Mapping[str, np.ndarray]
) -> dict[str, tuple[float, list[tuple[str, float]]]]:
    """Per profiled quantity with counts: its PSI and its bins by contribution, largest first."""
    found = {}
    for entry in profile.all():
        observed = counts.get(entry.name)
        if observed is None or not observed.sum():
            continue
        value, contributions = psi(entry.expected, observed)
        names = entry.bin_names()
        ranked = sorted(zip(names, contributions.tolist(), strict=True), key=lambda item: -abs(item[1]))
        found[entry.name] = (value if math.isfinite(value) else float("inf"), ranked)
    return found
