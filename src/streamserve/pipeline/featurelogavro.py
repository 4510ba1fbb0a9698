"""The Avro bytes of a feature-log record (schemas/feature_log.avsc), written by hand, byte-identical to fastavro.

fastavro's schemaless_writer costs ~15 us per record of this schema (a map of a four-branch union), which at a
1% share is ~0.15 us on every scored event; avrocolumns/ does not cover a map of unions. The schema is fixed and
small, so its encoding is spelled out here (zig-zag varints, little-endian doubles, length-prefixed UTF-8, one
block per map or array), ~3 us per record. tests/unit/test_featurelog.py checks the bytes against fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

_DOUBLE = struct.Struct("<d").pack
NULL = b"\x00"


def varint(value: int) -> bytes:
    """A long as Avro writes it: zig-zag, then 7 bits a byte, low bits first."""
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def text(value: str) -> bytes:
    """An Avro string: its UTF-8 length, then its bytes."""
    data = value.encode()
    return varint(len(data)) + data


def optional_text(value: str | None) -> bytes:
    """A ["null", "string"] union."""
    return NULL if value is None else b"\x02" + text(value)


def optional_long(value: int | None) -> bytes:
    """A ["null", "long"] union (the event time)."""
    return NULL if value is None else b"\x02" + varint(value)


def label(value: int | str | None) -> bytes:
    """The ["null", "long", "string"] union of the predicted label."""
    if value is None:
        return NULL
    return b"\x02" + varint(value) if isinstance(value, int) else b"\x04" + text(value)


def feature_values(column: np.ndarray, rows: Sequence[int]) -> list[bytes]:
    """The map values of one feature column at the given rows: a double, a string or an array of doubles."""
    if column.ndim == 2:
        width = varint(column.shape[1]) if column.shape[1] else b""
        return [
            b"\x06" + width + b"".join(map(_DOUBLE, column[row].tolist())) + NULL if width else b"\x06" + NULL
            for row in rows
        ]
    values = column[list(rows)].tolist()
    if column.dtype == object:
        return [NULL if value is None else b"\x04" + text(str(value)) for value in values]
    return [b"\x02" + _DOUBLE(float(value)) for value in values]


def feature_map(keys: Sequence[bytes], values: Sequence[bytes]) -> bytes:
    """An Avro map in one block: its count, each key (already written) and value, then the end block."""
    if not keys:
        return NULL
    return varint(len(keys)) + b"".join(key + value for key, value in zip(keys, values, strict=True)) + NULL


def double(value: float) -> bytes:
    """An Avro double."""
    return _DOUBLE(value)
