"""Encoders of the Avro types that hold others: maps and arrays (one block, then the closing zero count), the
union of null and one type, and MapRows, a map column whose rows share their keys, written in one numpy pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import methodcaller
from typing import Any

import numpy as np

from streamserve.pipeline.avrocolumns.chunks import _BYTES, _EMPTY_BLOCKS, _assemble, _Chunk, _long, _varint_chunk
from streamserve.pipeline.avrocolumns.scalars import (
    RowWriter,
    _as_list,
    _Encoder,
    _NotPlain,
    _Real,
    _String,
    _type_error,
)

_VALUES = methodcaller("values")


@dataclass(frozen=True, slots=True)
class MapRows:
    """A map column whose rows all have the same keys: row i is ``dict(zip(keys, values[i]))``.

    ``values`` is a numeric (rows, len(keys)) array, e.g. a classifier's probabilities with its class names as
    keys. A map of float or double values is written as fixed-width rows in one numpy pass (the count and the
    keys' bytes are the same in every row); anything else (other value types, repeated keys, another shape) is
    written as those dicts would be.
    """

    keys: tuple[str, ...]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts (what fastavro would be given)."""
        return [dict(zip(self.keys, row, strict=True)) for row in self.values.tolist()]

    def take(self, rows: Sequence[int] | np.ndarray) -> MapRows:
        """The given rows."""
        return MapRows(self.keys, self.values[np.asarray(rows, dtype=np.intp)])


class _Blocks(_Encoder):
    """A map or an array: one block of all entries (count, entries) then the closing zero count."""

    def __init__(self, items: _Encoder, keyed: bool) -> None:
        self.items, self.keyed = items, keyed
        self.keys = _String(None, None)

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        values = _as_list(values)
        types = set(map(type, values))
        expected = Mapping if self.keyed else list
        if not all(issubclass(kind, expected) for kind in types):
            raise _type_error("a dict" if self.keyed else "a list", types)
        m = len(values)
        counts = np.fromiter(map(len, values), dtype=np.int64, count=m)
        closing = _Chunk.fixed(np.zeros(1, dtype=np.uint8))
        filled = np.flatnonzero(counts)
        if not len(filled):
            return [closing]
        if self.keyed:
            keys = list(chain.from_iterable(values))
            if not all(issubclass(kind, str) for kind in set(map(type, keys))):
                raise _type_error("str keys", set(map(type, keys)))
            items = list(chain.from_iterable(map(_VALUES, values)))
            entries = self.keys.encode(keys) + self.items.encode(items)
        else:
            entries = self.items.encode(list(chain.from_iterable(values)))
        data, entry_lengths = _assemble(entries, int(counts.sum()))
        row_lengths = np.bincount(np.repeat(np.arange(m), counts), weights=entry_lengths, minlength=m)
        return [_varint_chunk(counts[filled]).spread(filled, m), _Chunk.variable(data, row_lengths), closing]

    def row(self) -> RowWriter:
        items, keys = self.items.row(), self.keys.row()
        if self.keyed:

            def write_map(value: Any) -> bytes:
                if type(value) is not dict:
                    raise _NotPlain
                if not value:
                    return _EMPTY_BLOCKS
                parts = [_long(len(value))]
                for key, item in value.items():
                    parts.append(keys(key))
                    parts.append(items(item))
                parts.append(_EMPTY_BLOCKS)
                return b"".join(parts)

            return write_map

        def write_array(value: Any) -> bytes:
            if type(value) is not list:
                raise _NotPlain
            if not value:
                return _EMPTY_BLOCKS
            return b"".join([_long(len(value)), *map(items, value), _EMPTY_BLOCKS])

        return write_array


class _Nullable(_Encoder):
    """A union of null and one other type: the branch index, then the value when it is not None."""

    def __init__(self, inner: _Encoder, null_first: bool) -> None:
        self.inner = inner
        self.null_byte, self.value_byte = (0, 2) if null_first else (2, 0)

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        m = len(values)
        if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
            return [_Chunk.fixed(np.full((m, 1), self.value_byte, dtype=np.uint8)), *self.inner.encode(values)]
        values = _as_list(values)
        types = set(map(type, values))
        if any(issubclass(kind, tuple) for kind in types):
            raise TypeError("tuple (branch name, value) notation is not supported")
        if type(None) not in types:
            return [_Chunk.fixed(np.full((m, 1), self.value_byte, dtype=np.uint8)), *self.inner.encode(values)]
        nulls = np.array([value is None for value in values], dtype=bool)
        branch = np.where(nulls, self.null_byte, self.value_byte).astype(np.uint8)[:, None]
        present = np.flatnonzero(~nulls)
        if not len(present):
            return [_Chunk.fixed(branch)]
        inner = self.inner.encode([value for value in values if value is not None])
        return [_Chunk.fixed(branch), *(chunk.spread(present, m) for chunk in inner)]

    def row(self) -> RowWriter:
        inner, null, present = self.inner.row(), _BYTES[self.null_byte], _BYTES[self.value_byte]

        def write(value: Any) -> bytes:
            return null if value is None else present + inner(value)

        return write


def _map_rows(encoder: _Encoder, column: MapRows) -> list[_Chunk]:
    """The chunks of a MapRows column for a map field (or a union of null and a map)."""
    blocks = encoder.inner if isinstance(encoder, _Nullable) else encoder
    keys, values = column.keys, column.values
    if not (
        isinstance(blocks, _Blocks)
        and blocks.keyed
        and isinstance(blocks.items, _Real)
        and values.ndim == 2
        and values.shape[1] == len(keys)
        and values.dtype.kind in "iuf"
        and all(type(key) is str for key in keys)
        and len(set(keys)) == len(keys)
    ):
        return encoder.encode(column.rows())
    m, k = values.shape
    if k:
        with np.errstate(over="ignore", invalid="ignore"):  # as _Real: through float64, then a C cast
            packed = np.ascontiguousarray(values.astype(np.float64).astype(blocks.items.dtype))
        size = packed.dtype.itemsize
        cells = packed.view(np.uint8).reshape(m, k, size)
        names = list(map(blocks.keys.row(), keys))
        count = _long(k)
        body = np.empty((m, len(count) + sum(map(len, names)) + k * size + 1), dtype=np.uint8)
        body[:, : len(count)] = np.frombuffer(count, dtype=np.uint8)
        position = len(count)
        for j, name in enumerate(names):
            body[:, position : position + len(name)] = np.frombuffer(name, dtype=np.uint8)
            position += len(name)
            body[:, position : position + size] = cells[:, j]
            position += size
        body[:, position] = 0  # the closing empty block
    else:
        body = np.zeros((m, 1), dtype=np.uint8)  # every row an empty map
    chunks = [_Chunk.fixed(body)]
    if isinstance(encoder, _Nullable):
        chunks.insert(0, _Chunk.fixed(np.full((m, 1), encoder.value_byte, dtype=np.uint8)))
    return chunks
