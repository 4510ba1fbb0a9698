"""The bytes of a column: zig-zag varints, chunks (one piece of a field for every row), and their assembly into
one buffer cut into rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_GROUP_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)
_PADDING_FACTOR = 4  # padded matrix at most this many times the bytes written (plus the slack per row)
_PADDING_SLACK = 64
_SMALL_VARINTS = 1 << 14
"""Zig-zagged values below this have their varint bytes precomputed (lengths, counts, small ints)."""


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
