"""Feature building: event fields plus Redis entities, one pipelined round trip per micro-batch.

An entity is a Redis hash (one field per feature; the fields of all a batch's keys of one key template in
one EVALSHA of a small Lua script) or a packed little-endian float32 vector (one value per entity, MGET of
all a batch's keys in one command). Either way it is one command per key template and one round trip. A group's
reply stays one flat list (keys x fields), read a field at a time by slicing; values are parsed once per distinct
key, a column at a time, and the batch's matrix is assembled with numpy, not per event.
"""

from __future__ import annotations

import contextlib
import logging
import math
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import redis

from streamserve.config import FeatureSpec, RedisSettings
from streamserve.errors import EnrichError, FeatureError
from streamserve.pipeline.fields import getter, millis_timestamp, text_getter, to_number, to_text
from streamserve.records import Event, FeatureBatch, Rejected

log = logging.getLogger(__name__)

_TRUE_TEXT = {"1", "true", "True", "TRUE", "yes", "y", "on"}
_FALSE_TEXT = {"0", "false", "False", "FALSE", "no", "n", "off"}


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
_NONE = type(None)
_FLOAT32 = np.dtype("<f4")
_NO_STAMP = b"-inf"


@dataclass(frozen=True, slots=True)
class _KeyGroup:
    """Redis features that share a key template: one HMGET per distinct key, or one MGET (packed)."""

    template: str
    fields: tuple[str, ...]
    updated_at_field: str | None
    packed: bool = False
    width: int = 0
    """Elements of the packed vector the features use (largest index + 1)."""

    @property
    def requested(self) -> list[str] | None:
        """The hash fields read for each key (the update stamp last); None for packed vectors."""
        if self.packed:
            return None
        return [*self.fields, *([self.updated_at_field] if self.updated_at_field else [])]


FeatureRequest = tuple[list[str] | None, list[str]]
"""(hash fields, distinct keys) of one key group; fields None asks for the keys' packed vectors (MGET)."""


@dataclass(slots=True)
class Replies:
    """One key group's reply, in the order of the keys asked: for hashes one flat list of keys x fields values
    (row-major, None where absent), for packed vectors one bytes (or None) per key. ``errors``: the keys whose
    read failed (WRONGTYPE...), by position; their values are ignored."""

    values: list[Any]
    errors: dict[int, Exception] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: Exception, keys: int, width: int) -> Replies:
        """Every key of the group carries the error."""
        return cls([None] * (keys * width), dict.fromkeys(range(keys), error))


FetchFeatures = Callable[[Sequence[FeatureRequest]], list[Replies]]
"""Given one request per key group, one Replies per group."""


HMGET_MANY = """
local out, errors, n = {}, {}, 0
for i = 1, #KEYS do
  local values = redis.pcall('HMGET', KEYS[i], unpack(ARGV))
  if type(values) == 'table' and values.err then
    errors[#errors + 1] = tostring(i)
    errors[#errors + 1] = values.err
    values = {}
  end
  for j = 1, #ARGV do
    n = n + 1
    out[n] = values[j] or false
  end
end
return {out, errors}
"""
"""HMGET of the same fields for many keys as one command: a flat reply (keys x fields, nil where absent) and
the keys whose HMGET failed (e.g. WRONGTYPE) with their error, so one bad key does not fail the batch."""


class PendingReplies(Protocol):
    """A feature fetch under way (started ahead of the batch that needs it)."""

    def result(self) -> list[Replies]:
        """The replies, as the fetcher's call would have returned them (its errors and policies too)."""
        ...

    def cancel(self) -> None:
        """The replies will not be read (the batch changed): free what the fetch holds."""
        ...

    @property
    def sent(self) -> bool:
        """The requests went out ahead (False: result() makes the whole call)."""
        ...


StartFetch = Callable[[Sequence[FeatureRequest]], PendingReplies]
"""Sends one request per key group now; the PendingReplies' result() waits for them."""


class _Deferred:
    """A fetch with no head start: result() makes the call (fetchers that cannot send ahead, fakes in tests)."""

    def __init__(self, fetch: FetchFeatures, requests: Sequence[FeatureRequest]) -> None:
        self._fetch, self._requests = fetch, requests

    def result(self) -> list[Replies]:
        return self._fetch(self._requests)

    def cancel(self) -> None:
        pass

    sent = False


class RedisFetcher:
    """Every key of every group in one pipelined round trip (one command per key template); retry with backoff.

    Called, it sends and waits. ``start()`` sends the commands on a connection of its own and returns at once:
    the worker starts the next batch's lookup before it scores the current one, so Redis works through the keys
    while this process encodes and produces (no helper thread: the reply waits in the socket until ``result()``
    reads it). A head start that meets an error (connection lost, timeout, a script Redis forgot, ACLs) is
    dropped and the batch is fetched again the usual way, with the retries and the ``redis.on_error`` policy.
    """

    def __init__(self, client: redis.Redis, settings: RedisSettings) -> None:
        self.client = client
        self.settings = settings
        self.script = _HashScript(client)
        self.resume_ahead_at = 0.0

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        return _redis_fetch_with_retry(self.client, self.script, requests, self.settings)

    def start(self, requests: Sequence[FeatureRequest]) -> PendingReplies:
        """Send the requests now; result() reads the replies (or fetches again on any error)."""
        if self.script.sha is None and not self.script.refused and any(fields for fields, _ in requests):
            return _Deferred(self, requests)  # the first hash lookup loads the script the usual way
        if time.monotonic() < self.resume_ahead_at:
            return _Deferred(self, requests)  # Redis failed a lookup sent ahead lately: no second wait per batch
        commands = _commands(requests, self.script.sha)
        pool = self.client.connection_pool
        try:
            connection = _take_connection(pool)
        except redis.RedisError:
            self.failed_ahead()
            return _Deferred(self, requests)
        try:
            connection.send_packed_command(connection.pack_commands(commands))
        except redis.RedisError:
            _discard(pool, connection)
            self.failed_ahead()
            return _Deferred(self, requests)
        except BaseException:
            _discard(pool, connection)
            raise
        return _Sent(self, requests, len(commands), connection, per_key=self.script.sha is None)

    def failed_ahead(self) -> None:
        """A lookup sent ahead met a Redis error: send none ahead for AHEAD_BACKOFF_S (the usual fetch retries)."""
        self.resume_ahead_at = time.monotonic() + AHEAD_BACKOFF_S


class _Sent:
    """Commands sent on a connection taken from the pool; their replies not read yet."""

    def __init__(
        self, fetcher: RedisFetcher, requests: Sequence[FeatureRequest], count: int, connection: Any, per_key: bool
    ) -> None:
        self._fetcher, self._requests, self._count, self._connection = fetcher, requests, count, connection
        self._per_key = per_key

    def result(self) -> list[Replies]:
        connection, self._connection = self._connection, None
        if connection is None:
            raise RuntimeError("the replies of a fetch are read once")
        pool = self._fetcher.client.connection_pool
        replies: list[Any] = []
        try:
            for _ in range(self._count):
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:  # a key's or a group's error (WRONGTYPE...): as execute() does
                    replies.append(exc)
        except redis.RedisError as exc:
            _discard(pool, connection)
            self._fetcher.failed_ahead()
            log.info("Redis lookup started ahead failed (%s): fetching the batch again", exc)
            return self._fetcher(self._requests)
        except BaseException:
            _discard(pool, connection)
            raise
        pool.release(connection)
        if any(isinstance(reply, _FETCH_AGAIN) for reply in replies):
            return self._fetcher(self._requests)  # reloads the script, or raises as the usual fetch would
        return _parse_replies(self._requests, replies, self._per_key)

    def cancel(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            _discard(self._fetcher.client.connection_pool, connection)

    sent = True


AHEAD_BACKOFF_S = 5.0
"""After a lookup sent ahead failed, this long without sending ahead (an outage costs the usual retries only)."""
_FETCH_AGAIN = (redis.exceptions.NoScriptError, redis.exceptions.NoPermissionError)
"""Replies the usual fetch knows what to do with (load the script again; refuse as an outage)."""


def _take_connection(pool: Any) -> Any:
    """A connection of the pool for our own use (connected, nothing unread on it)."""
    try:
        return pool.get_connection()
    except TypeError:  # redis-py 5 still requires a command name, which newer versions deprecate
        return pool.get_connection("EVALSHA")


def _discard(pool: Any, connection: Any) -> None:
    """Close a connection whose replies are unread or broken, and give it back to the pool (it reconnects)."""
    connection.disconnect()
    pool.release(connection)


def redis_fetcher(client: redis.Redis, settings: RedisSettings) -> RedisFetcher:
    """The feature fetcher of a Redis client (see RedisFetcher)."""
    return RedisFetcher(client, settings)


def _commands(requests: Sequence[FeatureRequest], sha: str | None) -> list[tuple[Any, ...]]:
    """The commands of one fetch: MGET per packed group, EVALSHA per hash group (HMGET per key without scripts)."""
    commands: list[tuple[Any, ...]] = []
    for fields, group_keys in requests:
        if not group_keys:
            continue
        if fields is None:
            commands.append(("MGET", *group_keys))
        elif sha is None:
            commands += [("HMGET", key, *fields) for key in group_keys]
        else:
            commands.append(("EVALSHA", sha, len(group_keys), *group_keys, *fields))
    return commands


class _HashScript:
    """HMGET_MANY loaded once by its SHA1; loaded again if the server forgot it (a restart, SCRIPT FLUSH).

    Where scripts are not allowed (an ACL user limited to reads, a proxy without scripting), hashes are read
    with one pipelined HMGET per key instead: the same replies, more client work per key.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.sha: str | None = None
        self.refused = False

    def load(self) -> str | None:
        """The script's SHA1, or None when this server or user does not allow scripts."""
        if self.refused:
            return None
        try:
            self.sha = str(self.client.script_load(HMGET_MANY))
        except (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError) as exc:
            log.warning("Redis refuses scripts (%s): reading hashes with one HMGET per key", exc)
            self.refused = True
            return None
        return self.sha


def _redis_fetch_with_retry(
    client: redis.Redis, script: _HashScript, requests: Sequence[FeatureRequest], settings: RedisSettings
) -> list[Replies]:
    attempt = 0
    while True:
        try:
            sha = script.sha or script.load()
            pipe = client.pipeline(transaction=False)
            for command in _commands(requests, sha):
                pipe.execute_command(*command)
            replies = pipe.execute(raise_on_error=False)  # a failing key or group is rejected, not the worker
            if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
                script.sha = None
                continue
            if any(isinstance(reply, redis.exceptions.NoPermissionError) for reply in replies):
                raise redis.exceptions.NoPermissionError(next(str(r) for r in replies if isinstance(r, Exception)))
            break
        except redis.RedisError as exc:  # the feature store, never a record: retried, then redis.on_error
            if attempt >= settings.retries and settings.on_error != "wait":
                raise EnrichError(
                    f"Redis unavailable after {attempt + 1} attempts: {type(exc).__name__}: {exc}"
                ) from exc
            delay = min(settings.backoff_ms * 2 ** min(attempt, 16), settings.max_backoff_ms) / 1000
            limit = "until it answers" if settings.on_error == "wait" else f"of {settings.retries}"
            log.warning("Redis error (%s), retry %d %s in %.2fs", exc, attempt + 1, limit, delay)
            time.sleep(delay)
            attempt += 1
    return _parse_replies(requests, replies, script.sha is None)


def _parse_replies(requests: Sequence[FeatureRequest], replies: list[Any], per_key: bool) -> list[Replies]:
    """One Replies per group from the raw replies of _commands (per_key: hashes were read with HMGET per key)."""
    results: list[Replies] = []
    position = 0
    for fields, group_keys in requests:
        width = 1 if fields is None else len(fields)
        if not group_keys:
            results.append(Replies([]))
            continue
        if fields is not None and per_key:  # one HMGET reply (or error) per key
            values: list[Any] = []
            errors: dict[int, Exception] = {}
            for i, reply in enumerate(replies[position : position + len(group_keys)]):
                if isinstance(reply, Exception):
                    errors[i], reply = reply, [None] * width
                values += reply
            results.append(Replies(values, errors))
            position += len(group_keys)
            continue
        reply = replies[position]
        position += 1
        if isinstance(reply, Exception):  # every key of the group carries the error: its events are rejected
            results.append(Replies.failed(reply, len(group_keys), width))
        elif fields is None:
            results.append(Replies(reply))
        else:
            flat, failures = reply
            results.append(
                Replies(
                    flat,
                    {
                        int(failures[i]) - 1: redis.ResponseError(failures[i + 1].decode(errors="replace"))
                        for i in range(0, len(failures), 2)
                    },
                )
            )
    return results


def _distinct(keys: list[str | None]) -> list[str]:
    """The keys once each, in order of first appearance, without None (no entity)."""
    found = dict.fromkeys(keys)
    found.pop(None, None)
    return cast("list[str]", list(found))


def _unpack_vectors(replies: list[Any], width: int) -> np.ndarray:
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


def _simple_template(template: str) -> tuple[str, str, str] | None:
    """(field, prefix, suffix) of a ``prefix{field}suffix`` template (one plain field, no format spec), else None."""
    parts = list(string.Formatter().parse(template))
    names = [name for _, name, _, _ in parts if name is not None]
    simple = all(not spec and conversion is None for _, name, spec, conversion in parts if name is not None)
    if not (simple and len(names) == 1 and names[0].isidentifier()):
        return None
    return names[0], parts[0][0], "".join(literal for literal, *_ in parts[1:])


def _column_renderer(
    template: str, event_schema: Any | None = None
) -> Callable[[list[dict[str, Any]]], list[str | None]]:
    """_key_renderer for all the events of a batch at once: their keys, or the error of the first event that cannot
    fill the template (KeyError...: the caller then goes event by event). A ``prefix{field}suffix`` template over
    a text field reads the field as a column and formats it in one comprehension."""
    render = _key_renderer(template, event_schema)
    simple = _simple_template(template)
    if simple is None or millis_timestamp(event_schema, simple[0]):
        return lambda everything: list(map(render, everything))
    name, prefix, suffix = simple

    def render_all(everything: list[dict[str, Any]]) -> list[str | None]:
        values = [fields[name] for fields in everything]
        keys: list[str | None]
        if set(map(type, values)) <= {str}:
            keys = [f"{prefix}{value}{suffix}" for value in values]
        else:
            keys = list(map(render, everything))  # numbers as text; a null raises KeyError
        return keys

    return render_all


def _key_renderer(template: str, event_schema: Any | None = None) -> Callable[[dict[str, Any]], str]:
    """Fills a key template from event field paths; KeyError when a field is null or absent (no entity).

    ``prefix{field}suffix`` renders as one f-string; other shapes (several fields, dotted paths, format
    specs) go through ``str.format`` with each field's value read by its path. A timestamp-millis field
    renders as the datetime it stands for (see fields.text_getter).
    """
    parts = list(string.Formatter().parse(template))
    names = [name for _, name, _, _ in parts if name is not None]
    simple = _simple_template(template)
    if simple is not None:
        name, prefix, suffix = simple
        moment = text_getter(name, event_schema) if millis_timestamp(event_schema, name) else None

        def render_one(fields: dict[str, Any]) -> str:
            value = fields[name] if moment is None else moment(fields)
            if value is None:
                raise KeyError(name)
            return f"{prefix}{value if isinstance(value, str) else to_text(value)}{suffix}"

        return render_one
    getters = {name: text_getter(name, event_schema) for name in dict.fromkeys(names) if name}
    order = list(getters)
    positional = ""
    for literal, field_name, spec, conversion in parts:
        positional += literal.replace("{", "{{").replace("}", "}}")
        if field_name is not None:
            positional += "{" + str(order.index(field_name)) + (f"!{conversion}" if conversion else "")
            positional += (f":{spec}" if spec else "") + "}"

    def render(fields: dict[str, Any]) -> str:
        values = []
        for name, get in getters.items():
            value = get(fields)
            if value is None:
                raise KeyError(name)
            values.append(value)
        return positional.format(*values)

    return render


@dataclass(frozen=True, slots=True)
class PendingLookup:
    """A batch's Redis lookup sent ahead (FeatureBuilder.start_lookup), with the keys it asked for."""

    events: Sequence[Event]
    keys_per_group: list[list[str | None]]
    distinct: list[list[str]]
    lookup: PendingReplies


class FeatureBuilder:
    """Builds each feature's column for a batch of events: numbers as float64, categories as text or codes.

    A feature that cannot be built for an event (null or missing without a default, NaN or an infinity in an
    event field, a value that does not parse or does not fit its dtype, an array of the wrong length) rejects
    that event with a reason; the others go on.
    """

    def __init__(
        self,
        features: Sequence[FeatureSpec],
        fetch: FetchFeatures | None,
        clock_ms: Callable[[], float] = lambda: time.time() * 1000,
        event_schema: Any | None = None,
    ) -> None:
        """``event_schema`` (JSON form): timestamp-millis key fields and categories render as datetimes."""
        self.features = list(features)
        self.fetch = fetch
        self._clock_ms = clock_ms
        groups: dict[str, list[FeatureSpec]] = {}
        for spec in self.features:
            if spec.source == "redis":
                groups.setdefault(spec.key or "", []).append(spec)
        self._groups = []
        for template, specs in groups.items():
            layouts = {spec.layout for spec in specs}
            if len(layouts) > 1:
                raise ValueError(f"features of key {template!r} mix layouts {sorted(layouts)}")
            packed = layouts == {"packed"}
            self._groups.append(
                _KeyGroup(
                    template=template,
                    fields=() if packed else tuple(dict.fromkeys(spec.field for spec in specs)),
                    updated_at_field=next((s.updated_at_field for s in specs if s.updated_at_field), None),
                    packed=packed,
                    width=max((spec.index or 0) + 1 for spec in specs) if packed else 0,
                )
            )
        self._group_of = {template: i for i, template in enumerate(groups)}
        self._requested = [group.requested for group in self._groups]
        self._widths = [1 if fields is None else len(fields) for fields in self._requested]
        """Values per key in each group's reply: the fields read (hashes), or the one vector (packed)."""
        self._renderers = [_key_renderer(group.template, event_schema) for group in self._groups]
        self._column_renderers = [_column_renderer(group.template, event_schema) for group in self._groups]
        self._getters = {
            spec.name: text_getter(spec.field, event_schema) if spec.categorical else getter(spec.field)
            for spec in self.features
            if spec.source == "event"
        }
        self._codes = {
            spec.name: {value: float(i) for i, value in enumerate(spec.vocabulary or [])}
            for spec in self.features
            if spec.encoding != "none"
        }
        if self._groups and fetch is None:
            raise ValueError("Redis features need a Redis fetcher")
        self.start_fetch: StartFetch | None = getattr(fetch, "start", None)
        """Sends a fetch ahead (a fetcher with ``start``); None: start_lookup defers the call to build()."""

    @property
    def width(self) -> int:
        """Number of model input columns per event, over all features."""
        return sum(spec.width for spec in self.features)

    @property
    def reads_redis(self) -> bool:
        """Some features come from Redis (a batch's round trip can be started ahead: start_lookup)."""
        return bool(self._groups)

    def start_lookup(self, events: Sequence[Event]) -> PendingLookup:
        """Send the events' Redis lookup now; build(events, pending=...) reads its replies.

        The worker starts the next batch's lookup before it scores the current batch, so that Redis works
        through its keys while this batch is scored, encoded and produced, instead of the loop waiting for it.
        The values are read that much earlier; freshness is judged when the batch is built.
        """
        keys_per_group = self._render_keys(events)
        distinct = [_distinct(keys) for keys in keys_per_group]
        requests = list(zip(self._requested, distinct, strict=True))
        assert self.fetch is not None
        started = self.start_fetch(requests) if self.start_fetch is not None else _Deferred(self.fetch, requests)
        return PendingLookup(events, keys_per_group, distinct, started)

    def build(
        self, events: Sequence[Event], redis_available: bool = True, pending: PendingLookup | None = None
    ) -> FeatureBatch:
        """Columns for the events whose features could be built; the others are rejected with a reason.

        With ``redis_available=False`` every Redis feature takes its default and the batch is flagged
        degraded (the ``defaults`` policy for feature-store outages). ``pending``: the lookup start_lookup()
        sent for these same events (the very list); its replies are read here, its errors raised here.
        """
        n = len(events)
        reasons: dict[int, str] = {}
        if pending is not None and (pending.events is not events or not redis_available):
            pending.lookup.cancel()
            pending = None
        if pending is not None:
            keys_per_group, distinct = pending.keys_per_group, pending.distinct
        else:
            keys_per_group = self._render_keys(events)
            distinct = [_distinct(keys) for keys in keys_per_group]
        degraded = bool(self._groups) and not redis_available
        widths = self._widths
        if degraded or not self._groups:
            lookups = [Replies([None] * (len(keys) * width)) for keys, width in zip(distinct, widths, strict=True)]
        elif pending is not None:
            lookups = pending.lookup.result()
        else:
            lookups = self._lookup(distinct)
        # Per group, each event's row among the distinct keys (the extra last row stands for "no entity": a key
        # field was null).
        rows = []
        for keys, group_keys in zip(keys_per_group, distinct, strict=True):
            position: dict[str | None, int] = {key: i for i, key in enumerate(group_keys)}
            position[None] = len(group_keys)
            rows.append(np.fromiter(map(position.__getitem__, keys), dtype=np.intp, count=n))
        replies: list[list[Any]] = []  # per group, the reply values (keys x fields, row-major)
        for g, (lookup, group_keys, width) in enumerate(zip(lookups, distinct, widths, strict=True)):
            got = lookup.values
            if len(got) != len(group_keys) * width:
                raise EnrichError(  # the fetcher broke its contract (a bug, not an outage); no record is at fault
                    f"feature fetcher bug: {len(got)} values for {len(group_keys)} keys x {width} fields "
                    f"of {self._groups[g].template!r}"
                )
            if lookup.errors:  # a Redis error for a key (WRONGTYPE...) rejects its events
                got = list(got)
                for i, error in lookup.errors.items():
                    got[i * width : (i + 1) * width] = [None] * width
                    for row in np.flatnonzero(rows[g] == i):
                        reasons.setdefault(int(row), f"Redis key {group_keys[i]!r}: {error}")
            replies.append(got)
        vectors = [
            _unpack_vectors(group_replies, group.width) if group.packed else None
            for group, group_replies in zip(self._groups, replies, strict=True)
        ]
        now_ms = self._clock_ms()
        everything = [event.fields for event in events]
        columns: dict[str, np.ndarray] = {}
        missing_defaults = stale_defaults = 0
        for spec in self.features:
            stale = None
            exact: np.ndarray | None = None  # int features: the exact int64 values beside the float view
            if spec.source == "event":
                raw = list(map(self._getters[spec.name], everything))
                if spec.categorical:
                    columns[spec.name] = self._categories(spec, raw, reasons)
                    continue
                if spec.length is not None:
                    columns[spec.name] = self._vectors(spec, raw, reasons)
                    continue
                if spec.dtype in _INT_DTYPES:
                    values, exact = self._int_column(spec, raw, reasons, finite_only=True)
                else:
                    values = self._parse_column(spec, raw, reasons, finite_only=True)
            else:
                g = self._group_of[spec.key or ""]
                group, event_rows = self._groups[g], rows[g]
                packed = vectors[g]
                if packed is not None:
                    values = packed[event_rows, spec.index]
                else:
                    raw = replies[g][group.fields.index(spec.field) :: widths[g]]
                    if spec.categorical:
                        column = self._categories(spec, [*raw, None], {}, per_key=True)
                        columns[spec.name] = self._fill_text(spec, column[event_rows], reasons)
                        continue
                    key_reasons: dict[int, str] = {}
                    if spec.dtype in _INT_DTYPES:
                        per_key, per_key_exact = self._int_column(spec, raw, key_reasons)
                        exact = np.append(per_key_exact, 0)[event_rows]
                    else:
                        per_key = self._parse_column(spec, raw, key_reasons)
                    values = np.append(per_key, np.nan)[event_rows]
                    if key_reasons:
                        for row in np.flatnonzero(np.isin(event_rows, list(key_reasons))):
                            reasons.setdefault(int(row), key_reasons[int(event_rows[row])])
                    stale = self._stale_mask(spec, replies[g][len(group.fields) :: widths[g]], now_ms, event_rows)
            missing = np.isnan(values)
            if stale is not None:
                stale &= ~missing
                values[stale] = np.nan
            bad = np.isnan(values)
            if spec.default is not None:
                values[bad] = float(spec.default)
                if exact is not None:
                    exact[bad] = int(float(spec.default))
                missing_defaults += int(missing.sum())
                stale_defaults += int(stale.sum()) if stale is not None else 0
            else:
                for row in np.flatnonzero(bad):
                    why = "stale" if stale is not None and stale[row] else "missing (null or NaN)"
                    reasons.setdefault(int(row), f"feature {spec.name!r}: {why} and no default")
            columns[spec.name] = values if exact is None else exact
        if not reasons:
            return FeatureBatch(list(events), columns, missing_defaults, stale_defaults, degraded)
        keep = np.array([row for row in range(n) if row not in reasons], dtype=np.intp)
        return FeatureBatch(
            events=[events[row] for row in keep],
            columns={name: column[keep] for name, column in columns.items()},
            missing_defaults=missing_defaults,
            stale_defaults=stale_defaults,
            degraded=degraded,
            rejected=[
                Rejected(events[row].source, FeatureError.stage, FeatureError.__name__, reason)
                for row, reason in sorted(reasons.items())
            ],
        )

    def _render_keys(self, events: Sequence[Event]) -> list[list[str | None]]:
        """Per group, the Redis key of each event (None when a key field is null: no entity)."""
        rendered: list[list[str | None]] = []
        everything = [event.fields for event in events]
        for render, render_all in zip(self._renderers, self._column_renderers, strict=True):
            try:
                rendered.append(render_all(everything))
                continue
            except (KeyError, ValueError, IndexError, TypeError):
                pass  # find the events that cannot fill the template
            column: list[str | None] = []
            for event in events:
                try:
                    column.append(render(event.fields))
                except (KeyError, ValueError, IndexError, TypeError):
                    column.append(None)
            rendered.append(column)
        return rendered

    def _lookup(self, distinct: list[list[str]]) -> list[Replies]:
        assert self.fetch is not None
        return self.fetch(list(zip(self._requested, distinct, strict=True)))

    @staticmethod
    def _stale_mask(spec: FeatureSpec, raw: list[Any], now_ms: float, event_rows: np.ndarray) -> np.ndarray | None:
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

    def _categories(
        self, spec: FeatureSpec, raw: list[Any], reasons: dict[int, str], per_key: bool = False
    ) -> np.ndarray:
        """Text of each value (None where null); then defaults and the vocabulary unless ``per_key``."""
        texts = np.empty(len(raw), dtype=object)
        for row, value in enumerate(raw):
            if value is None:
                continue
            try:
                texts[row] = value if isinstance(value, str) else to_text(value)
            except (TypeError, ValueError) as exc:
                reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.80} is not a category: {exc}")
        return texts if per_key else self._fill_text(spec, texts, reasons)

    def _fill_text(self, spec: FeatureSpec, texts: np.ndarray, reasons: dict[int, str]) -> np.ndarray:
        """Defaults for nulls, then the string column, or its ordinal codes / one-hot columns."""
        for row in np.flatnonzero(np.array([text is None for text in texts], dtype=bool)):
            if spec.default is not None:
                texts[row] = str(spec.default)
            else:
                reasons.setdefault(int(row), f"feature {spec.name!r}: missing (null) and no default")
                texts[row] = ""
        if spec.encoding == "none":
            return texts
        codes = self._codes[spec.name]
        unknown = float(len(codes))
        ordinal = np.fromiter((codes.get(text, unknown) for text in texts), dtype=np.float64, count=len(texts))
        if spec.encoding == "ordinal":
            return ordinal
        onehot = np.zeros((len(texts), len(codes) + 1))
        onehot[np.arange(len(texts)), ordinal.astype(np.intp)] = 1.0
        return onehot

    def _vectors(self, spec: FeatureSpec, raw: list[Any], reasons: dict[int, str]) -> np.ndarray:
        """A (rows, length) matrix of array fields (int64 for integer dtypes, else float64); nulls take the
        default in every element."""
        length = spec.length or 1
        integers = spec.dtype in _INT_DTYPES
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
            if integers:
                element_reasons: dict[int, str] = {}
                _, exact = self._int_column(spec, list(value), element_reasons, finite_only=True)
                if element_reasons:
                    reasons.setdefault(row, next(iter(element_reasons.values())))
                elif any(element is None for element in value):
                    reasons.setdefault(row, f"feature {spec.name!r}: a null element in the array")
                else:
                    out[row] = exact
                continue
            try:
                vector = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                reasons.setdefault(row, f"feature {spec.name!r}: not an array of numbers: {exc}")
                continue
            if not np.isfinite(vector).all():
                reasons.setdefault(row, f"feature {spec.name!r}: NaN or infinity in the array")
            elif (why := _out_of_range(spec.dtype, vector)) is not None:
                reasons.setdefault(row, f"feature {spec.name!r}: {why}")
            else:
                out[row] = vector
        return out

    @staticmethod
    def _int_column(
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
            try:
                if isinstance(value, (int, str, bytes)):
                    number = int(value)
                else:
                    real = to_number(value)
                    if not math.isfinite(real):
                        if finite_only:
                            reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not a finite number")
                        continue  # stored NaN/Inf: missing
                    if not real.is_integer():
                        reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not an {spec.dtype} integer")
                        continue
                    number = int(real)
            except (TypeError, ValueError, ArithmeticError) as exc:
                reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r:.80} as {spec.dtype}: {exc}")
                continue
            if not -limit <= number < limit:
                reasons.setdefault(row, f"feature {spec.name!r}: {value!r:.40} is not an {spec.dtype} integer")
                continue
            exact[row] = number
            values[row] = float(number)
        return values, exact

    @staticmethod
    def _parse_column(
        spec: FeatureSpec, raw: list[Any], reasons: dict[int, str], finite_only: bool = False
    ) -> np.ndarray:
        """Floats of one column (NaN where missing); unparseable or out-of-range values give their row a reason.

        ``finite_only`` (event fields): NaN and infinities are bad values, not missing ones.
        """
        kinds = set(map(type, raw))
        numeric = _NUMERIC_TYPES[spec.dtype]
        values: np.ndarray | None = None
        if kinds <= numeric:
            values = np.array(raw, dtype=np.float64)
        elif kinds <= numeric | {_NONE}:
            values = np.array([math.nan if value is None else value for value in raw], dtype=np.float64)
        elif kinds <= {bytes, _NONE} and spec.dtype in ("float32", "float64"):
            with contextlib.suppress(ValueError):  # numpy parses the bytes of a whole column in C; else below
                values = np.array([b"nan" if value is None else value for value in raw], dtype=np.bytes_).astype(
                    np.float64
                )
        if values is None:
            parse = _PARSERS[spec.dtype]
            values = np.full(len(raw), math.nan)
            for row, value in enumerate(raw):
                if value is None:
                    continue
                try:
                    values[row] = parse(value)
                except (TypeError, ValueError, ArithmeticError) as exc:
                    reasons.setdefault(row, f"feature {spec.name!r}: cannot parse {value!r:.80} as {spec.dtype}: {exc}")
        finite = np.isfinite(values)
        if not finite.all():
            if finite_only:
                for bad in map(int, np.flatnonzero(~finite)):
                    if raw[bad] is not None and bad not in reasons:
                        reasons[bad] = f"feature {spec.name!r}: {raw[bad]!r:.40} is not a finite number"
            else:
                values[np.isinf(values)] = math.nan  # stored infinities count as missing, like NaN
        if (why := _out_of_range(spec.dtype, values[finite])) is not None:
            for bad in map(int, np.flatnonzero(finite)):
                if _out_of_range(spec.dtype, values[bad : bad + 1]) is not None:
                    reasons.setdefault(bad, f"feature {spec.name!r}: {raw[bad]!r:.40} {why}")
        return values


_INT_DTYPES = ("int32", "int64")
_LIMITS = {
    "float32": float(np.finfo(np.float32).max),
    "int32": float(2**31),
    "int64": float(2**63),
}


def _out_of_range(dtype: str, values: np.ndarray) -> str | None:
    """Why finite values do not fit the feature's dtype (None when they all do)."""
    limit = _LIMITS.get(dtype)
    if limit is None or not len(values):
        return None
    if dtype == "float32":
        return None if np.all(np.abs(values) <= limit) else "is out of float32 range"
    if np.all((values >= -limit) & (values < limit)) and np.all(values == np.floor(values)):
        return None
    return f"is not an {dtype} integer"
