"""Feature values parsed a column at a time: numbers, exact integers, update stamps and packed vectors.

Each parser returns the column as numpy and gives each row it cannot use a reason (``reasons``: row -> why);
numpy parses a whole column in C where the values allow it, and falls back to one value at a time otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from streamserve.config import FeatureSpec
from streamserve.pipeline.fields import to_number

_TRUE_TEXT = {"1", "true", "True", "TRUE", "yes", "y", "on"}
_FALSE_TEXT = {"0", "false", "False", "FALSE", "no", "n", "off"}
INT_DTYPES = ("int32", "int64")
_NONE = type(None)
_FLOAT32 = np.dtype("<f4")
_NO_STAMP = b"-inf"


def _parse_bool(raw: Any) -> float:
    """1.0 or 0.0; a non-finite number or an unknown word is not a boolean."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, str):
        word = raw.strip()
        if word in _TRUE_TEXT or word in _FALSE_TEXT:
            return float(word in _TRUE_TEXT)
        raise ValueError("not a boolean word")
    number = to_number(raw)
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return float(number != 0)


_PARSERS: dict[str, Callable[[Any], float]] = {
    "float32": to_number,
    "float64": to_number,
    "int32": lambda raw: float(int(raw)) if isinstance(raw, (str, bytes)) else to_number(raw),
    "int64": lambda raw: float(int(raw)) if isinstance(raw, (str, bytes)) else to_number(raw),
    "bool": _parse_bool,
}
# Python types whose values numpy turns into the same float as the dtype's parser does.
_NUMERIC_TYPES: dict[str, set[type]] = {
    "float32": {float, int, bool},
    "float64": {float, int, bool},
    "int32": {int, bool},
    "int64": {int, bool},
    "bool": {bool},
    "string": set(),
}
_LIMITS = {
    "float32": float(np.finfo(np.float32).max),
    "int32": float(2**31),
    "int64": float(2**63),
}


def parse_column(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str], finite_only: bool = False) -> np.ndarray:
    """Floats of one column (NaN where missing); unparseable or out-of-range values give their row a reason.

    ``finite_only`` (event fields): NaN and infinities are bad values, not missing ones.
    """
    values = _numpy_column(spec, raw)
    if values is None:
        values = _parsed_one_by_one(spec, raw, reasons)
    finite = np.isfinite(values)
    if not finite.all():
        if finite_only:
            for bad in map(int, np.flatnonzero(~finite)):
                if raw[bad] is not None and bad not in reasons:
                    reasons[bad] = f"feature {spec.name!r}: {raw[bad]!r:.40} is not a finite number"
        else:
            values[np.isinf(values)] = math.nan  # stored infinities count as missing, like NaN
    if (why := out_of_range(spec.dtype, values[finite])) is not None:
        for bad in map(int, np.flatnonzero(finite)):
            if out_of_range(spec.dtype, values[bad : bad + 1]) is not None:
                reasons.setdefault(bad, f"feature {spec.name!r}: {raw[bad]!r:.40} {why}")
    return values


def _numpy_column(spec: FeatureSpec, raw: list[Any]) -> np.ndarray | None:
    """The column parsed by numpy in one call when its values' types allow it (None: parse them one by one)."""
    kinds = set(map(type, raw))
    numeric = _NUMERIC_TYPES[spec.dtype]
    if kinds <= numeric:
        return np.array(raw, dtype=np.float64)
    if kinds <= numeric | {_NONE}:
        return np.array([math.nan if value is None else value for value in raw], dtype=np.float64)
    if kinds <= {bytes, _NONE} and spec.dtype in ("float32", "float64"):
        with contextlib.suppress(ValueError):  # numpy parses the bytes of a whole column in C; else one by one
            return np.array([b"nan" if value is None else value for value in raw], dtype=np.bytes_).astype(np.float64)
    return None


def _parsed_one_by_one(spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
    """The column parsed value by value with the dtype's parser (NaN and a reason where one does not parse)."""
    parse = _PARSERS[spec.dtype]
    values = np.full(len(raw), math.nan)
    for row, value in enumerate(raw):
        if value is None:
            continue
        try:
            values[row] = parse(value)
        except (TypeError, ValueError, ArithmeticError) as exc:
            reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r:.80} as {spec.dtype}: {exc}")
    return values


def int_column(
    spec: FeatureSpec, raw: list[Any], reasons: dict[int, str], finite_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(float64 view with NaN where missing, exact int64 values) of an int32/int64 feature column.

    Integers travel as int64 end to end, so ids and counts above 2**53 reach an int64 input exactly.
    """
    n = len(raw)
    limit = 2**31 if spec.dtype == "int32" else 2**63
    if set(map(type, raw)) <= {int, bool}:
        with contextlib.suppress(OverflowError):  # a Python int beyond int64: found below
            exact = np.array(raw, dtype=np.int64)
            if spec.dtype == "int64" or not len(exact) or (exact.min() >= -limit and exact.max() < limit):
                return exact.astype(np.float64), exact
    exact = np.zeros(n, dtype=np.int64)
    values = np.full(n, math.nan)
    for row, value in enumerate(raw):
        if value is None:
            continue
        number = _integer(spec, value, row, reasons, finite_only)
        if number is None:
            continue
        if not -limit <= number < limit:
            reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not an {spec.dtype} integer")
            continue
        exact[row] = number
        values[row] = float(number)
    return values, exact


def _integer(spec: FeatureSpec, value: Any, row: int, reasons: dict[int, str], finite_only: bool) -> int | None:
    """One value as an integer; None when it is missing (a stored NaN/Inf) or bad (then with a reason)."""
    try:
        if isinstance(value, (int, str, bytes)):
            return int(value)
        real = to_number(value)
        if not math.isfinite(real):
            if finite_only:
                reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not a finite number")
            return None  # stored NaN/Inf: missing
        if not real.is_integer():
            reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not an {spec.dtype} integer")
            return None
        return int(real)
    except (TypeError, ValueError, ArithmeticError) as exc:
        reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r:.80} as {spec.dtype}: {exc}")
        return None


def out_of_range(dtype: str, values: np.ndarray) -> str | None:
    """Why finite values do not fit the feature's dtype (None when they all do)."""
    limit = _LIMITS.get(dtype)
    if limit is None or not len(values):
        return None
    if dtype == "float32":
        return None if np.all(np.abs(values) <= limit) else "is out of float32 range"
    if np.all((values >= -limit) & (values < limit)) and np.all(values == np.floor(values)):
        return None
    return f"is not an {dtype} integer"


def stale_mask(spec: FeatureSpec, raw: list[Any], now_ms: float, event_rows: np.ndarray) -> np.ndarray | None:
    """Per event, whether the update stamps (one per key, ``raw``) say its key's values are too old."""
    if spec.max_age_s is None:
        return None
    oldest_ms = now_ms - spec.max_age_s * 1000
    try:  # every stamp at once, parsed by numpy in C; a missing one cannot prove the values fresh
        stamps = np.array([_NO_STAMP if value is None else value for value in raw], dtype=np.bytes_)
        if stamps.shape != (len(raw),):
            raise ValueError("not one stamp per key")
        parsed = stamps.astype(np.float64)
    except (TypeError, ValueError):  # one unreadable stamp (it cannot prove its values fresh): one by one
        parsed = np.full(len(raw), -math.inf)
        for i, value in enumerate(raw):
            if value is not None:
                with contextlib.suppress(TypeError, ValueError):
                    parsed[i] = float(value)
    return np.append(parsed, -math.inf)[event_rows] < oldest_ms


def unpack_vectors(replies: list[Any], width: int) -> np.ndarray:
    """(keys + 1, width) float64 matrix of packed vectors; missing or short values are NaN, as is the last row."""
    out = np.full((len(replies) + 1, width), np.nan)
    size = width * _FLOAT32.itemsize
    if replies and None not in replies and set(map(len, replies)) == {size}:
        out[:-1] = np.frombuffer(b"".join(replies), dtype=_FLOAT32).reshape(len(replies), width)
        return out
    for row, value in enumerate(replies):
        if value:
            vector = np.frombuffer(value[: len(value) // _FLOAT32.itemsize * _FLOAT32.itemsize][:size], _FLOAT32)
            out[row, : len(vector)] = vector
    return out
