"""Writing aggregates to Redis in the layout the worker reads, never replacing a newer entry with an older one.

One EVALSHA of WRITE_IF_NEWER per entity, all of a batch's in one pipelined round trip. Each entry carries its
stamp: ``updated_at`` (the entity's latest event time, epoch ms; the worker's ``max_age_s`` reads it) and
``updated_at.events`` (how many events the entity's state holds). The script writes only when the new stamp is
not older - a later event time, or the same one with at least as many events. One writer per entity is already
guaranteed by partitioning (the input is keyed by the entity, faust gives each partition to one app); the check
is what keeps a replay, a zombie after a rebalance, or a state restored from an older changelog from turning an
entry back. A hash entry keeps its stamp in the same hash; a packed vector keeps it in the hash ``<key>#stamp``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

WRITE_IF_NEWER = """
local time, events = tonumber(ARGV[2]), tonumber(ARGV[3])
local old = redis.call('HMGET', KEYS[2], ARGV[1], ARGV[1] .. '.events')
local old_time, old_events = tonumber(old[1]), tonumber(old[2])
if old_time and (old_time > time or (old_time == time and old_events and old_events > events)) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2], ARGV[1] .. '.events', ARGV[3])
if ARGV[4] == 'packed' then
  if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[5]) end
  for i = 6, #ARGV, 2 do redis.call('SETRANGE', KEYS[1], tonumber(ARGV[i]), ARGV[i + 1]) end
  return 1
end
for i = 6, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
"""
"""KEYS: the entry, where its stamp is kept. ARGV: stamp field, latest event time, events, layout, a packed
vector's initial bytes (NaN: missing), then (hash field or byte offset, value) pairs; '' deletes a hash field."""

_FLOAT32 = struct.Struct("<f")
STAMP_SUFFIX = "#stamp"


@dataclass(frozen=True, slots=True)
class Entry:
    """One entity's aggregates to write: its key, stamp and values (None: no value, e.g. the mean of nothing)."""

    key: str
    latest_ms: int
    events: int
    values: Mapping[str, float | None]


def _hash_args(values: Mapping[str, float | None]) -> list[str]:
    return [part for name, value in values.items() for part in (name, "" if value is None else repr(value))]


def _packed_args(values: Mapping[str, float | None], indexes: Mapping[str, int]) -> list[str | bytes]:
    args: list[str | bytes] = []
    for name, value in values.items():
        number = math.nan if value is None else value
        try:
            packed = _FLOAT32.pack(number)
        except OverflowError:  # beyond float32: the worker reads a NaN element as missing
            packed = _FLOAT32.pack(math.nan)
        args += [str(indexes[name] * 4), packed]
    return args


class AggregateStore:
    """Writes entries of one layout; ``write`` returns how many the script refused as older than Redis's."""

    def __init__(self, client: redis.Redis, stamp_field: str) -> None:
        self.client = client
        self.stamp_field = stamp_field
        self.sha: str | None = None

    def write(self, groups: Sequence[tuple[str, Mapping[str, int], Sequence[Entry]]]) -> int:
        """Write every (layout, packed indexes, entries) group in one round trip; the count of refused entries."""
        if self.sha is None:
            self.sha = str(self.client.script_load(WRITE_IF_NEWER))
        pipe = self.client.pipeline(transaction=False)
        for layout, indexes, entries in groups:
            width = (max(indexes.values()) + 1) if indexes else 0
            initial = _FLOAT32.pack(math.nan) * width
            for entry in entries:
                stamp_key = entry.key + STAMP_SUFFIX if layout == "packed" else entry.key
                pairs = _packed_args(entry.values, indexes) if layout == "packed" else _hash_args(entry.values)
                pipe.evalsha(
                    self.sha,
                    2,
                    entry.key,
                    stamp_key,
                    self.stamp_field,
                    str(entry.latest_ms),
                    str(entry.events),
                    layout,
                    initial,
                    *pairs,
                )
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:
            self.sha = None  # the server forgot the script (a restart, SCRIPT FLUSH): load it and write again
            return self.write(groups)
        return sum(1 for reply in replies if reply == 0)
