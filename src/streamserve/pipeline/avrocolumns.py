"""Column-wise Avro encoding: one schemaless record per row, byte-identical to fastavro's schemaless_writer.

A batch arrives as named columns (numpy arrays or lists, one value per row, a scalar for a value shared by
every row, or a MapRows for a map whose rows all have the same keys). Each field is encoded for the whole column
at once (zig-zag varints and doubles with numpy, strings joined and encoded once), and the pieces are scattered
into one buffer that is cut into per-row records. The writer covers the record schemas streamserve owns;
`ColumnWriter.for_schema` returns None for any other construct, and the caller keeps fastavro.

What a column may hold is what fastavro's validator admits for the field, row value by row value (a numpy
column's row value is `column.tolist()[i]`). For those values the bytes are fastavro's; anything else raises
ValueError or TypeError naming the field, where fastavro alone might silently coerce (True into a long, 2**40
into an int, 1.5 into a long) or refuse. Dates and timestamps given as date/datetime objects are converted by
fastavro's own logical writers, so naive datetimes mean local time exactly as they do in fastavro.

Small batches take a row path first: numpy's per-call cost makes the column path ~0.8 ms per batch whatever its
size, while a few rows of plain Python values (exact str, int, float, bool, None, bytes, dict, list) are cheaper
written one value at a time with precomputed varints. The row path writes only such values and hands anything
else (numpy scalars, subclasses, datetimes, out-of-range numbers, lone surrogates...) to the column path, which
decides as above; so both paths write the same bytes, and the same values raise.
"""

from __future__ import annotations

import numbers
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import methodcaller
from typing import Any

import fastavro
import numpy as np
from fastavro.logical_writers import LOGICAL_WRITERS

_INT_RANGE = (-(2**31), 2**31 - 1)
_LONG_RANGE = (-(2**63), 2**63 - 1)
_GROUP_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_UNSUPPORTED_LOGICAL = {"bytes-decimal", "fixed-decimal"}  # Decimal arithmetic is not mirrored here
_CONSTANT_CACHE_SIZE = 256
_VALUES = methodcaller("values")
_PADDING_FACTOR = 4  # padded matrix at most this many times the bytes written (plus the slack per row)
_PADDING_SLACK = 64
_CACHED_TYPES = (str, int, bool, type(None))
ROWS_BELOW = 96
"""Batches of fewer rows try the row path first: ~5-6 us per prediction row against the column path's ~0.5-0.7 ms
per batch plus ~3 us per row (`python -m bench.avrocolumns_bench 1 32 64 96 128 256`)."""
_SMALL_VARINTS = 1 << 14
"""Zig-zagged values below this have their varint bytes precomputed (lengths, counts, small ints)."""


class _NotPlain(Exception):
    """A value the row path leaves to the column path."""


def _varint(zigzag: int) -> bytes:
    """The varint bytes of a non-negative (already zig-zagged) value."""
    out = bytearray()
    while zigzag >= 0x80:
        out.append((zigzag & 0x7F) | 0x80)
        zigzag >>= 7
    out.append(zigzag)
    return bytes(out)


_VARINTS = tuple(_varint(z) for z in range(_SMALL_VARINTS))
_BYTES = tuple(bytes([b]) for b in range(256))
_EMPTY_BLOCKS = b"\x00"


def _long(value: int) -> bytes:
    """A long (or int) as Avro writes it: zig-zag varint."""
    zigzag = (value << 1) ^ (value >> 63)
    return _VARINTS[zigzag] if zigzag < _SMALL_VARINTS else _varint(zigzag)


RowWriter = Callable[[Any], bytes]
"""One plain value's bytes; raises _NotPlain (or any error) for what the column path must decide."""


@dataclass(frozen=True, slots=True)
class Constant:
    """A value shared by every row (needed only where a list would read as a column: array fields)."""

    value: Any


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


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Encoded bytes of one piece of a field for m rows.

    Fixed width (width >= 0): data is (m, width) uint8, or (width,) when every row holds the same bytes.
    Variable width (width == -1): data is the rows' bytes back to back and lengths holds each row's count.
    """

    data: np.ndarray
    lengths: np.ndarray | None
    width: int

    @staticmethod
    def fixed(data: np.ndarray) -> _Chunk:
        return _Chunk(data, None, data.shape[-1])

    @staticmethod
    def variable(data: np.ndarray, lengths: np.ndarray) -> _Chunk:
        return _Chunk(data, lengths.astype(np.int64, copy=False), -1)

    def row_lengths(self, m: int) -> np.ndarray:
        return self.lengths if self.lengths is not None else np.full(m, self.width, dtype=np.int64)

    def spread(self, rows: np.ndarray, n: int) -> _Chunk:
        """This chunk's m rows placed at positions `rows` of n rows; the other rows hold nothing."""
        lengths = np.zeros(n, dtype=np.int64)
        lengths[rows] = self.row_lengths(len(rows))
        data = self.data if self.width < 0 else np.broadcast_to(self.data, (len(rows), self.width)).reshape(-1)
        return _Chunk.variable(data, lengths)


def _bytes_chunk(buffer: bytes, lengths: np.ndarray) -> _Chunk:
    return _Chunk.variable(np.frombuffer(buffer, dtype=np.uint8), lengths)


def _varint_chunk(values: np.ndarray) -> _Chunk:
    """Zig-zag varints of an int64 column."""
    signed = values.astype(np.int64, copy=False)
    if not len(signed) or (int(signed.min()) >= 0 and int(signed.max()) < 0x40):  # one byte each: lengths, counts
        return _Chunk.fixed((signed << 1).astype(np.uint8)[:, None])
    zigzag = (signed.view(np.uint64) << np.uint64(1)) ^ (signed >> np.int64(63)).view(np.uint64)
    top = int(zigzag.max()) if len(zigzag) else 0
    if top < 0x80:
        return _Chunk.fixed(zigzag.astype(np.uint8)[:, None])
    width = (top.bit_length() + 6) // 7
    sizes = np.searchsorted(_VARINT_LIMITS[: width - 1], zigzag, side="right") + 1
    groups = ((zigzag[:, None] >> _GROUP_SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    positions = np.arange(width)
    groups |= (positions < (sizes - 1)[:, None]).astype(np.uint8) << np.uint8(7)
    if int(sizes.min()) == width:
        return _Chunk.fixed(groups)
    return _Chunk.variable(groups[positions < sizes[:, None]], sizes)


def _assemble(chunks: Sequence[_Chunk], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate the chunks row by row: one flat buffer and each row's length.

    Every chunk gets a band of a padded (n, width) matrix, its bytes left-aligned in each row; one boolean
    mask then reads the rows back to back. A chunk much wider than its average row (one long string) would
    make that matrix large, so such batches are scattered byte by byte instead.
    """
    chunks = [_regular(chunk, n) for chunk in chunks]
    widths = [chunk.width if chunk.lengths is None else _max(chunk.lengths) for chunk in chunks]
    payload = sum(len(chunk.data) if chunk.lengths is not None else n * chunk.width for chunk in chunks)
    if n * sum(widths) > _PADDING_FACTOR * payload + _PADDING_SLACK * n:
        return _scatter(chunks, n)
    total_width = sum(widths)
    matrix = np.empty((n, total_width), dtype=np.uint8)
    mask: np.ndarray | None = None
    row_lengths = np.zeros(n, dtype=np.int64)
    left = 0
    for chunk, width in zip(chunks, widths, strict=True):
        band = matrix[:, left : left + width]
        if chunk.lengths is None:
            band[...] = chunk.data
            row_lengths += width
        elif width:
            if mask is None:
                mask = np.ones((n, total_width), dtype=bool)
            band_mask = np.arange(width) < chunk.lengths[:, None]
            band[band_mask] = chunk.data
            mask[:, left : left + width] = band_mask
            row_lengths += chunk.lengths
        left += width
    return (matrix.reshape(-1) if mask is None else matrix[mask]), row_lengths


def _regular(chunk: _Chunk, n: int) -> _Chunk:
    """A variable chunk whose rows all have the same length, as a fixed one (no mask needed)."""
    if chunk.lengths is None or not n or len(chunk.data) != n * int(chunk.lengths[0]):
        return chunk
    if (chunk.lengths != chunk.lengths[0]).any():
        return chunk
    return _Chunk.fixed(chunk.data.reshape(n, int(chunk.lengths[0])))


def _max(lengths: np.ndarray) -> int:
    return int(lengths.max()) if len(lengths) else 0


def _scatter(chunks: Sequence[_Chunk], n: int) -> tuple[np.ndarray, np.ndarray]:
    """`_assemble` by computing every byte's place: slower, but no padding."""
    sizes = np.empty((n, len(chunks)), dtype=np.int64)
    for j, chunk in enumerate(chunks):
        sizes[:, j] = chunk.lengths if chunk.lengths is not None else chunk.width
    ends = np.cumsum(sizes, axis=None).reshape(sizes.shape)  # row-major: each piece's end in the buffer
    starts = ends - sizes
    out = np.empty(int(ends[-1, -1]) if sizes.size else 0, dtype=np.uint8)
    for j, chunk in enumerate(chunks):
        if chunk.lengths is None:
            if chunk.width:
                out[starts[:, j, None] + np.arange(chunk.width)] = chunk.data
        elif len(chunk.data):
            lengths = chunk.lengths
            shift = starts[:, j] - (np.cumsum(lengths) - lengths)
            out[np.repeat(shift, lengths) + np.arange(len(chunk.data))] = chunk.data
    return out, sizes.sum(axis=1)


def _type_error(what: str, types: set[type]) -> TypeError:
    names = ", ".join(sorted(t.__name__ for t in types))
    return TypeError(f"expected {what}, got {names}")


def _as_list(values: np.ndarray | list[Any]) -> list[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else values


def _is_integral(kind: type) -> bool:
    return issubclass(kind, numbers.Integral) and not issubclass(kind, bool)


def _is_real(kind: type) -> bool:
    return issubclass(kind, numbers.Real) and not issubclass(kind, (bool, np.bool_))


class _Encoder:
    """Encodes m admissible values (no nulls of a union) into chunks."""

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        raise NotImplementedError

    def row(self) -> RowWriter:
        """The row path's writer of one value."""
        raise NotImplementedError


class _Null(_Encoder):
    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        if any(value is not None for value in _as_list(values)):
            raise TypeError("expected None for a null field")
        return []

    def row(self) -> RowWriter:
        def write(value: Any) -> bytes:
            if value is not None:
                raise _NotPlain
            return b""

        return write


class _Boolean(_Encoder):
    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        if not (isinstance(values, np.ndarray) and values.dtype.kind == "b"):
            values = _as_list(values)
            types = set(map(type, values))
            if not types <= {bool}:
                raise _type_error("bool", types)
        return [_Chunk.fixed(np.asarray(values, dtype=np.uint8)[:, None])]

    def row(self) -> RowWriter:
        def write(value: Any) -> bytes:
            if value is True:
                return b"\x01"
            if value is False:
                return b"\x00"
            raise _NotPlain

        return write


class _Integer(_Encoder):
    def __init__(self, bounds: tuple[int, int], prepare: Callable[[Any, Any], Any] | None, schema: Any) -> None:
        self.bounds, self.prepare, self.schema = bounds, prepare, schema

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        low, high = self.bounds
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            if len(values) and (int(values.min()) < low or int(values.max()) > high):
                raise ValueError(f"value out of range [{low}, {high}]")
            return [_varint_chunk(values.astype(np.int64))]
        values = _as_list(values)
        if self.prepare is not None:
            prepare, schema = self.prepare, self.schema
            values = [value if type(value) is int else prepare(value, schema) for value in values]
        types = set(map(type, values))
        if types - {int}:
            if not all(map(_is_integral, types)):
                raise _type_error("an integer", types)
            values = [int(value) for value in values]
        try:
            column = np.array(values, dtype=np.int64)
        except OverflowError as exc:
            raise ValueError(f"value out of range [{low}, {high}]") from exc
        if low != _LONG_RANGE[0] and len(column) and (int(column.min()) < low or int(column.max()) > high):
            raise ValueError(f"value out of range [{low}, {high}]")
        return [_varint_chunk(column)]

    def row(self) -> RowWriter:
        low, high = self.bounds

        def write(value: Any) -> bytes:
            if type(value) is not int or not low <= value <= high:
                raise _NotPlain
            return _long(value)

        return write


class _Real(_Encoder):
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        if isinstance(values, np.ndarray) and values.dtype.kind in "iuf":
            column = values.astype(np.float64)
        else:
            values = _as_list(values)
            types = set(map(type, values))
            if types - {float}:
                if not all(map(_is_real, types)):
                    raise _type_error("a number", types)
                values = [float(value) for value in values]  # huge ints raise OverflowError, as in fastavro
            column = np.array(values, dtype=np.float64)
        # a double beyond float32 is written as inf and a signalling NaN quieted, as C casts them
        with np.errstate(over="ignore", invalid="ignore"):
            packed = column.astype(self.dtype)
        return [_Chunk.fixed(packed.view(np.uint8).reshape(len(column), packed.itemsize))]

    def row(self) -> RowWriter:
        if self.dtype == "<f8":
            pack = struct.Struct("<d").pack

            def write_double(value: Any) -> bytes:
                if type(value) is not float:
                    raise _NotPlain
                return pack(value)

            return write_double
        pack_float = struct.Struct("<f").pack

        def write_float(value: Any) -> bytes:
            # NaNs go to the column path: from Python 3.14 struct keeps a signalling NaN signalling when it
            # narrows it, where fastavro's C cast quiets it. A float beyond float32 makes struct raise
            # OverflowError: the column path writes it as inf, as fastavro does.
            if type(value) is not float or value != value:
                raise _NotPlain
            return pack_float(value)

        return write_float


class _String(_Encoder):
    def __init__(self, prepare: Callable[[Any, Any], Any] | None, schema: Any) -> None:
        self.prepare, self.schema = prepare, schema

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        values = _as_list(values)
        if self.prepare is not None:
            prepare, schema = self.prepare, self.schema
            values = [value if type(value) is str else prepare(value, schema) for value in values]
        types = set(map(type, values))
        if types - {str} and not all(issubclass(kind, str) for kind in types):
            raise _type_error("str", types)
        text = "".join(values)
        encoded = text.encode()  # lone surrogates raise UnicodeEncodeError, as in fastavro
        if len(encoded) == len(text):  # all ASCII: character counts are byte counts
            lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        else:
            parts = [value.encode() for value in values]
            lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        return [_varint_chunk(lengths), _bytes_chunk(encoded, lengths)]

    def row(self) -> RowWriter:
        def write(value: Any) -> bytes:
            if type(value) is not str:  # what a logical type's writer would convert: the column path
                raise _NotPlain
            data = value.encode()  # a lone surrogate raises: the column path
            return _long(len(data)) + data

        return write


class _Bytes(_Encoder):
    def __init__(self, size: int | None) -> None:
        self.size = size

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        values = _as_list(values)
        types = set(map(type, values))
        if not types <= {bytes, bytearray}:
            raise _type_error("bytes", types)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        data = b"".join(values)
        if self.size is None:
            return [_varint_chunk(lengths), _bytes_chunk(data, lengths)]
        if len(lengths) and (lengths != self.size).any():
            raise ValueError(f"expected {self.size} bytes, got {sorted(set(lengths.tolist()) - {self.size})}")
        return [_Chunk.fixed(np.frombuffer(data, dtype=np.uint8).reshape(len(values), self.size))]

    def row(self) -> RowWriter:
        size = self.size

        def write(value: Any) -> bytes:
            if type(value) is not bytes:
                raise _NotPlain
            if size is None:
                return _long(len(value)) + value
            if len(value) != size:
                raise _NotPlain
            return value

        return write


class _Enum(_Encoder):
    def __init__(self, symbols: Sequence[str]) -> None:
        self.index = {symbol: i for i, symbol in enumerate(symbols)}

    def encode(self, values: np.ndarray | list[Any]) -> list[_Chunk]:
        index = self.index
        try:
            positions = [index[value] for value in _as_list(values)]
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]!r} is not a symbol of the enum {list(index)}") from exc
        return [_varint_chunk(np.array(positions, dtype=np.int64))]

    def row(self) -> RowWriter:
        written = {symbol: _long(position) for symbol, position in self.index.items()}

        def write(value: Any) -> bytes:
            if type(value) is not str:
                raise _NotPlain
            return written[value]  # not a symbol: KeyError, the column path

        return write


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


def _compile(node: Any, named: Mapping[str, Any], within: str = "field") -> _Encoder | None:
    """The encoder of one schema node, or None when the node is outside the supported subset.

    `within` is where the node sits: "field" (a record field's type), "union" (the non-null branch) or
    "items" (a map's values, an array's items); unions nest in nothing, maps and arrays only in a union.
    """
    if isinstance(node, list):
        return _compile_union(node, named, within)
    if isinstance(node, str):
        if node in named:
            return _compile(named[node], named, within)
        node = {"type": node}
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        return None
    kind = node["type"]
    logical = f"{kind}-{node['logicalType']}" if node.get("logicalType") else None
    if logical in _UNSUPPORTED_LOGICAL:
        return None
    if kind in ("map", "array"):
        if within == "items":
            return None
        items = _compile(node["values" if kind == "map" else "items"], named, "items")
        return None if items is None else _Blocks(items, keyed=kind == "map")
    return _compile_simple(kind, node, LOGICAL_WRITERS.get(logical) if logical else None)


def _compile_union(node: list[Any], named: Mapping[str, Any], within: str) -> _Encoder | None:
    """The encoder of a union of null and one other type (a record field's only), or None."""
    others = [branch for branch in node if branch != "null"]
    if within != "field" or len(node) != 2 or len(others) != 1:
        return None
    inner = _compile(others[0], named, "union")
    return None if inner is None else _Nullable(inner, node[0] == "null")


def _compile_simple(kind: str, node: dict[str, Any], prepare: Callable[[Any, Any], Any] | None) -> _Encoder | None:
    """The encoder of a type that holds no other type (prepare: its logical type's writer), or None."""
    if kind in ("int", "long"):
        return _Integer(_INT_RANGE if kind == "int" else _LONG_RANGE, prepare, node)
    if kind in ("float", "double"):
        return _Real("<f4" if kind == "float" else "<f8")
    if kind == "string":
        return _String(prepare, node)
    if kind == "null":
        return _Null()
    if kind == "boolean":
        return _Boolean()
    if kind in ("bytes", "fixed"):
        return _Bytes(int(node["size"]) if kind == "fixed" else None)
    if kind == "enum":
        return _Enum(node["symbols"])
    return None


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    encoder: _Encoder
    default: tuple[Any] | None  # (value,) used for a missing column; None when fastavro raises instead


def _value_of(field: _Field, columns: Mapping[str, Any]) -> Any:
    """A field's column, or its default as a Constant; ValueError when it has neither (fastavro raises too)."""
    if field.name in columns:
        return columns[field.name]
    if field.default is not None:
        return Constant(field.default[0])
    raise ValueError(f"field {field.name!r}: no value and no default")


def _is_column(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim > 0
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview))


class ColumnWriter:
    """Writes a batch of named columns as one schemaless Avro record per row."""

    def __init__(self, fields: Sequence[_Field]) -> None:
        self._fields = tuple(fields)
        self._rows = tuple(field.encoder.row() for field in self._fields)
        self._constants: dict[tuple[str, type, Any], bytes] = {}

    @classmethod
    def for_schema(cls, schema: Any) -> ColumnWriter | None:
        """A writer for a record schema (parsed or JSON), or None when the schema is outside the subset."""
        named: dict[str, Any] = {}
        parsed = fastavro.parse_schema(schema, named)
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            return None
        fields = []
        for field in parsed["fields"]:
            encoder = _compile(field["type"], named)
            if encoder is None:
                return None
            if "default" in field:
                default: tuple[Any] | None = (field["default"],)
            else:  # fastavro writes None for a missing field whose type mentions null (its test is `in`)
                default = (None,) if "null" in field["type"] else None
            fields.append(_Field(field["name"], encoder, default))
        return cls(fields)

    def write(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        """Encode n rows; a column is an array or list of n values, anything else one value for every row."""
        if n <= 0:
            return []
        if n < ROWS_BELOW:
            try:
                return self._write_rows(columns, n)
            except _NotPlain:
                pass  # a value the row path does not write: the column path decides
        chunks: list[_Chunk] = []
        shared = bytearray()  # adjacent constant fields, written as one piece
        for field in self._fields:
            value = _value_of(field, columns)
            try:
                encoded = self._field_chunks(field, value, n)
            except (ValueError, TypeError, OverflowError) as exc:
                error = TypeError if isinstance(exc, TypeError) else ValueError
                raise error(f"field {field.name!r}: {exc}") from exc
            if isinstance(encoded, bytes):
                shared += encoded
                continue
            if shared:
                chunks.append(_Chunk.fixed(np.frombuffer(bytes(shared), dtype=np.uint8)))
                shared.clear()
            chunks.extend(encoded)
        if shared:
            chunks.append(_Chunk.fixed(np.frombuffer(bytes(shared), dtype=np.uint8)))
        buffer, lengths = _assemble(chunks, n)
        data = buffer.tobytes()
        ends = np.cumsum(lengths).tolist()
        return [data[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    def _field_chunks(self, field: _Field, value: Any, n: int) -> list[_Chunk] | bytes:
        """One field's chunks for n rows; its bytes when one value is shared by every row."""
        if isinstance(value, MapRows):
            if len(value) != n:
                raise ValueError(f"column has {len(value)} values for {n} rows")
            return _map_rows(field.encoder, value)
        if isinstance(value, Constant) or not _is_column(value):
            return self._constant(field, value.value if isinstance(value, Constant) else value)
        if len(value) != n:
            raise ValueError(f"column has {len(value)} values for {n} rows")
        if isinstance(value, np.ndarray) and (value.ndim > 1 or value.dtype.kind not in "biuf"):
            if value.dtype.kind in "mMV":
                raise TypeError(f"numpy dtype {value.dtype} is not supported")
            value = value.tolist()
        return field.encoder.encode(value if isinstance(value, np.ndarray) else list(value))

    def _write_rows(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        """write() a value at a time, for plain Python values only; _NotPlain for anything else."""
        try:
            return self._rows_or_raise(columns, n)
        except _NotPlain:
            raise
        except Exception as exc:
            raise _NotPlain from exc

    def _rows_or_raise(self, columns: Mapping[str, Any], n: int) -> list[bytes]:
        pieces: list[Any] = []
        for field, write in zip(self._fields, self._rows, strict=True):
            value = _value_of(field, columns)
            if isinstance(value, MapRows):
                value = value.rows()
            elif isinstance(value, Constant) or not _is_column(value):
                pieces.append(repeat(self._constant(field, value.value if isinstance(value, Constant) else value), n))
                continue
            if len(value) != n:
                raise _NotPlain
            if isinstance(value, np.ndarray):
                if value.ndim > 1 or value.dtype.kind not in "biuf":
                    raise _NotPlain
                value = value.tolist()
            pieces.append(map(write, value))
        if not pieces:
            return [b""] * n
        return [b"".join(row) for row in zip(*pieces, strict=True)]

    def _constant(self, field: _Field, value: Any) -> bytes:
        """One field's bytes for a value shared by every row (cached for hashable values)."""
        # Only exact str/int/bool/None values are cached: equal floats can differ in bytes (-0.0, NaN payloads).
        key = (field.name, type(value), value) if type(value) in _CACHED_TYPES else None
        cached = self._constants.get(key) if key is not None else None
        if cached is not None:
            return cached
        if isinstance(value, np.ndarray | np.generic):  # as a numpy column's rows: Python values
            value = value.tolist()
        data, _ = _assemble(field.encoder.encode([value]), 1)
        encoded = data.tobytes()
        if key is not None:
            if len(self._constants) >= _CONSTANT_CACHE_SIZE:
                self._constants.clear()
            self._constants[key] = encoded
        return encoded
