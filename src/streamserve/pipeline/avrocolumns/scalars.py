"""Encoders of the Avro types that hold no other type: null, boolean, int and long, float and double, string,
bytes and fixed, enum. Each encodes a column at once (column path) and gives a writer of one plain value (row
path)."""

from __future__ import annotations

import numbers
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from streamserve.pipeline.avrocolumns.chunks import _bytes_chunk, _Chunk, _long, _varint_chunk

_INT_RANGE = (-(2**31), 2**31 - 1)
_LONG_RANGE = (-(2**63), 2**63 - 1)


class _NotPlain(Exception):
    """A value the row path leaves to the column path."""


RowWriter = Callable[[Any], bytes]
"""One plain value's bytes; raises _NotPlain (or any error) for what the column path must decide."""


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
