"""One column builder per kind of feature: event numbers, categories and arrays; Redis hash and packed values.

A builder turns a batch's event fields or Redis replies into its feature's column (float64, exact int64, text,
ordinal codes or one-hot) and gives each row it cannot fill a reason; FeatureBuilder runs one per feature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from streamserve.config import FeatureSpec
from streamserve.pipeline.features.values import INT_DTYPES, int_column, out_of_range, parse_column, stale_mask
from streamserve.pipeline.fields import getter, text_getter, to_text


@dataclass(slots=True)
class BatchInputs:
    """What a batch's columns are built from, and what building them found (reasons, defaults used)."""

    everything: list[dict[str, Any]]
    """Each event's fields."""
    rows: list[np.ndarray]
    """Per key group, each event's row among the group's distinct keys (the last row: no entity)."""
    replies: list[list[Any]]
    """Per key group, the reply values (keys x fields, row-major; packed: one bytes per key)."""
    vectors: list[np.ndarray | None]
    """Per key group, its packed vectors unpacked (keys + 1, width); None for hashes."""
    now_ms: float
    reasons: dict[int, str] = field(default_factory=dict)
    """Row -> why the event's features cannot be built (it is rejected)."""
    missing_defaults: int = 0
    stale_defaults: int = 0


class ColumnBuilder(Protocol):
    """Builds one feature's column for a batch."""

    name: str

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The feature's column (one row per event, or a matrix); rows it cannot fill get a reason."""
        ...


def column_builder(
    spec: FeatureSpec, group: int, fields: Sequence[str] | None, width: int, event_schema: Any
) -> ColumnBuilder:
    """The builder for a feature (``group``, ``fields``, ``width``: its Redis key group's position, its hash fields
    and the values per key in its reply, the update stamp after the fields)."""
    if spec.source == "event":
        if spec.categorical:
            return EventCategories(spec, text_getter(spec.field, event_schema))
        if spec.length is not None:
            return EventArrays(spec, getter(spec.field))
        return EventNumbers(spec, getter(spec.field))
    if fields is None:
        return PackedNumbers(spec, group)
    position = fields.index(spec.field)
    if spec.categorical:
        return HashCategories(spec, group, position, width)
    return HashNumbers(spec, group, position, width, stamp=width - 1)


class EventCategories:
    """A categorical event field: text, ordinal codes or one-hot columns."""

    def __init__(self, spec: FeatureSpec, get: Callable[[dict[str, Any]], Any]) -> None:
        self.name, self.spec, self.get = spec.name, spec, get
        self.codes = _codes(spec)

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The field's text, codes or one-hot columns (defaults for nulls)."""
        texts = categories(self.spec, list(map(self.get, batch.everything)), batch.reasons)
        return fill_text(self.spec, self.codes, texts, batch.reasons)


class EventArrays:
    """An array event field of fixed length: a (rows, length) matrix."""

    def __init__(self, spec: FeatureSpec, get: Callable[[dict[str, Any]], Any]) -> None:
        self.name, self.spec, self.get = spec.name, spec, get

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The arrays as a matrix."""
        return vectors(self.spec, list(map(self.get, batch.everything)), batch.reasons)


class EventNumbers:
    """A numeric event field (NaN and infinities are bad values, not missing ones)."""

    def __init__(self, spec: FeatureSpec, get: Callable[[dict[str, Any]], Any]) -> None:
        self.name, self.spec, self.get = spec.name, spec, get

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The field's numbers (exact int64 for integer dtypes), defaults where missing."""
        raw = list(map(self.get, batch.everything))
        if self.spec.dtype in INT_DTYPES:
            values, exact = int_column(self.spec, raw, batch.reasons, finite_only=True)
            return with_defaults(self.spec, values, exact, None, batch)
        return with_defaults(
            self.spec, parse_column(self.spec, raw, batch.reasons, finite_only=True), None, None, batch
        )


class PackedNumbers:
    """One element of a packed float32 vector per entity."""

    def __init__(self, spec: FeatureSpec, group: int) -> None:
        self.name, self.spec, self.group = spec.name, spec, group

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The element of each event's entity vector, defaults where missing."""
        packed = batch.vectors[self.group]
        assert packed is not None
        return with_defaults(self.spec, packed[batch.rows[self.group], self.spec.index], None, None, batch)


class HashCategories:
    """A categorical hash field, parsed once per distinct key."""

    def __init__(self, spec: FeatureSpec, group: int, position: int, width: int) -> None:
        self.name, self.spec, self.group, self.position, self.width = spec.name, spec, group, position, width
        self.codes = _codes(spec)

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The field's text, codes or one-hot columns per event (a value that is no text counts as missing)."""
        raw = batch.replies[self.group][self.position :: self.width]
        column = categories(self.spec, [*raw, None], {})  # a key's bad value counts as missing
        return fill_text(self.spec, self.codes, column[batch.rows[self.group]], batch.reasons)


class HashNumbers:
    """A numeric hash field, parsed once per distinct key; too old when its key's update stamp says so."""

    def __init__(self, spec: FeatureSpec, group: int, position: int, width: int, stamp: int) -> None:
        self.name, self.spec, self.group, self.position, self.width = spec.name, spec, group, position, width
        self.stamp = stamp
        """Position of the update stamp among the key's values, last (read only when the feature has a max age)."""

    def build(self, batch: BatchInputs) -> np.ndarray:
        """The field's numbers per event, defaults where missing or stale."""
        spec, replies, event_rows = self.spec, batch.replies[self.group], batch.rows[self.group]
        raw = replies[self.position :: self.width]
        key_reasons: dict[int, str] = {}
        exact = None
        if spec.dtype in INT_DTYPES:
            per_key, per_key_exact = int_column(spec, raw, key_reasons)
            exact = np.append(per_key_exact, 0)[event_rows]
        else:
            per_key = parse_column(spec, raw, key_reasons)
        values = np.append(per_key, np.nan)[event_rows]
        if key_reasons:
            for row in np.flatnonzero(np.isin(event_rows, list(key_reasons))):
                batch.reasons.setdefault(int(row), key_reasons[int(event_rows[row])])
        stale = None
        if spec.max_age_s is not None:
            stale = stale_mask(spec, replies[self.stamp :: self.width], batch.now_ms, event_rows)
        return with_defaults(spec, values, exact, stale, batch)


def with_defaults(
    spec: FeatureSpec, values: np.ndarray, exact: np.ndarray | None, stale: np.ndarray | None, batch: BatchInputs
) -> np.ndarray:
    """A numeric column with its default where a value is missing or stale (counted); without a default, those
    rows get a reason. Integer features return their exact int64 values."""
    missing = np.isnan(values)
    if stale is not None:
        stale &= ~missing
        values[stale] = np.nan
    bad = np.isnan(values)
    if spec.default is not None:
        values[bad] = float(spec.default)
        if exact is not None:
            exact[bad] = int(float(spec.default))
        batch.missing_defaults += int(missing.sum())
        batch.stale_defaults += int(stale.sum()) if stale is not None else 0
    else:
        for row in np.flatnonzero(bad):
            why = "stale" if stale is not None and stale[row] else "missing (null or NaN)"
            batch.reasons.setdefault(int(row), f"feature {spec.name!r}: {why} and no default")
    return values if exact is None else exact


def _codes(spec: FeatureSpec) -> dict[str, float]:
    """Each vocabulary word's ordinal code (the unknown word's is their count)."""
    return {value: float(i) for i, value in enumerate(spec.vocabulary or [])}


def categories(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
    """Text of each value (None where null; a value that is no text gets a reason)."""
    texts = np.empty(len(raw), dtype=object)
    for row, value in enumerate(raw):
        if value is None:
            continue
        try:
            texts[row] = value if isinstance(value, str) else to_text(value)
        except (TypeError, ValueError) as exc:
            reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.80} is not a category: {exc}")
    return texts


def fill_text(spec: FeatureSpec, codes: dict[str, float], texts: np.ndarray, reasons: dict[int, str]) -> np.ndarray:
    """Defaults for nulls, then the string column, or its ordinal codes / one-hot columns."""
    for row in np.flatnonzero(np.array([text is None for text in texts], dtype=bool)):
        if spec.default is not None:
            texts[row] = str(spec.default)
        else:
            reasons.setdefault(int(row), f"feature {spec.name!r}: missing (null) and no default")
            texts[row] = ""
    if spec.encoding == "none":
        return texts
    unknown = float(len(codes))
    ordinal = np.fromiter((codes.get(text, unknown) for text in texts), dtype=np.float64, count=len(texts))
    if spec.encoding == "ordinal":
        return ordinal
    onehot = np.zeros((len(texts), len(codes) + 1))
    onehot[np.arange(len(texts)), ordinal.astype(np.intp)] = 1.0
    return onehot


def vectors(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
    """A (rows, length) matrix of array fields (int64 for integer dtypes, else float64); nulls take the
    default in every element."""
    length = spec.length or 1
    integers = spec.dtype in INT_DTYPES
    if integers:
        out = np.full((len(raw), length), 0 if spec.default is None else int(float(spec.default)), np.int64)
    else:
        out = np.full((len(raw), length), math.nan if spec.default is None else float(spec.default))
    for row, value in enumerate(raw):
        if value is None:
            if spec.default is None:
                reasons.setdefault(row, f"feature {spec.name!r}: missing (null) and no default")
            continue
        if not isinstance(value, (list, tuple)) or len(value) != length:
            size = len(value) if isinstance(value, (list, tuple)) else "no array"
            reasons.setdefault(row, f"feature {spec.name!r}: expected {length} values, got {size}")
            continue
        vector, why = _integer_vector(spec, value) if integers else _float_vector(spec, value)
        if vector is not None:
            out[row] = vector
        elif why is not None:
            reasons.setdefault(row, why)
    return out


def _integer_vector(spec: FeatureSpec, value: list[Any] | tuple[Any, ...]) -> tuple[np.ndarray | None, str | None]:
    """(exact int64 elements, None) of one array, or (None, why) it does not fit the integer dtype."""
    element_reasons: dict[int, str] = {}
    _, exact = int_column(spec, list(value), element_reasons, finite_only=True)
    if element_reasons:
        return None, next(iter(element_reasons.values()))
    if any(element is None for element in value):
        return None, f"feature {spec.name!r}: a null element in the array"
    return exact, None


def _float_vector(spec: FeatureSpec, value: list[Any] | tuple[Any, ...]) -> tuple[np.ndarray | None, str | None]:
    """(float64 elements, None) of one array, or (None, why) they are not finite numbers in the dtype's range."""
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return None, f"feature {spec.name!r}: not an array of numbers: {exc}"
    if not np.isfinite(vector).all():
        return None, f"feature {spec.name!r}: NaN or infinity in the array"
    if (why := out_of_range(spec.dtype, vector)) is not None:
        return None, f"feature {spec.name!r}: {why}"
    return vector, None
