"""The Redis feature fetcher: every key of every group in one pipelined round trip, one command per key template.

Hash groups are read with one EVALSHA of HMGET_MANY (the fields of all a batch's keys at once), or one HMGET
per key where scripts are not allowed; packed groups with one MGET. A lookup can be sent ahead on a connection
of its own (:meth:`RedisFetcher.start`): its replies wait in the socket until the batch reads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import redis

from streamserve.config import RedisSettings
from streamserve.errors import EnrichError
from streamserve.pipeline.features.replies import FeatureRequest, PendingReplies, Replies

log = logging.getLogger(__name__)

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

AHEAD_BACKOFF_S = 5.0
"""After a lookup sent ahead failed, this long without sending ahead (an outage costs the usual retries only)."""
_FETCH_AGAIN = (redis.exceptions.NoScriptError, redis.exceptions.NoPermissionError)
"""Replies the usual fetch knows what to do with (load the script again; refuse as an outage)."""


class RedisFetcher:
    """Every key of every group in one pipelined round trip (one command per key template); retry with backoff.

    Called, it sends and waits. ``start()`` sends the commands on a connection of its own and returns at once:
    the worker starts the next batch's lookup before it scores the current one, so Redis works through the keys
    while this process encodes and produces (no helper thread: the reply waits in the socket until the pending
    replies are read). A head start that meets an error (connection lost, timeout, a script Redis forgot, ACLs)
    is dropped and the batch is fetched again the usual way, with the retries and the ``redis.on_error`` policy.
    """

    def __init__(self, client: redis.Redis, settings: RedisSettings) -> None:
        self.client = client
        self.settings = settings
        self.script = _HashScript(client)
        self.resume_ahead_at = 0.0

    def __call__(self, requests: Sequence[FeatureRequest]) -> list[Replies]:
        return _fetch_with_retry(self.client, self.script, requests, self.settings)

    def start(self, requests: Sequence[FeatureRequest]) -> PendingReplies:
        """Send the requests now; the pending replies' result() reads them (or fetches again on any error)."""
        if self.script.sha is None and not self.script.refused and any(fields for fields, _ in requests):
            return PendingReplies.deferred(self, requests)  # the first hash lookup loads the script the usual way
        if time.monotonic() < self.resume_ahead_at:
            return PendingReplies.deferred(self, requests)  # Redis failed a lookup sent ahead lately
        commands = _commands(requests, self.script.sha)
        pool = self.client.connection_pool
        try:
            connection = _take_connection(pool)
        except redis.RedisError:
            self.failed_ahead()
            return PendingReplies.deferred(self, requests)
        try:
            connection.send_packed_command(connection.pack_commands(commands))
        except redis.RedisError:
            _discard(pool, connection)
            self.failed_ahead()
            return PendingReplies.deferred(self, requests)
        except BaseException:
            _discard(pool, connection)
            raise
        held = [connection]  # emptied by the first read or drop: the connection goes back to the pool once
        per_key = self.script.sha is None
        read = partial(self._read_sent, held, requests, len(commands), per_key)
        return PendingReplies(requests, read, partial(self._drop_sent, held), sent=True)

    def failed_ahead(self) -> None:
        """A lookup sent ahead met a Redis error: send none ahead for AHEAD_BACKOFF_S (the usual fetch retries)."""
        self.resume_ahead_at = time.monotonic() + AHEAD_BACKOFF_S

    def _read_sent(
        self, held: list[Any], requests: Sequence[FeatureRequest], count: int, per_key: bool
    ) -> list[Replies]:
        """The replies of commands sent ahead on the held connection; on a Redis error, the usual fetch."""
        if not held:
            raise RuntimeError("the replies of a fetch are read once")
        connection = held.pop()
        pool = self.client.connection_pool
        replies: list[Any] = []
        try:
            for _ in range(count):
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as exc:  # a key's or a group's error (WRONGTYPE...): as execute() does
                    replies.append(exc)
        except redis.RedisError as exc:
            _discard(pool, connection)
            self.failed_ahead()
            log.info("Redis lookup started ahead failed (%s): fetching the batch again", exc)
            return self(requests)
        except BaseException:
            _discard(pool, connection)
            raise
        pool.release(connection)
        if any(isinstance(reply, _FETCH_AGAIN) for reply in replies):
            return self(requests)  # reloads the script, or raises as the usual fetch would
        return _parse_replies(requests, replies, per_key)

    def _drop_sent(self, held: list[Any]) -> None:
        """Replies that will not be read: close their connection (it reconnects when next taken)."""
        if held:
            _discard(self.client.connection_pool, held.pop())


def redis_fetcher(client: redis.Redis, settings: RedisSettings) -> RedisFetcher:
    """The feature fetcher of a Redis client (see RedisFetcher)."""
    return RedisFetcher(client, settings)


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

    def forget(self) -> None:
        """The server forgot the script: load it again before the next fetch."""
        self.sha = None

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


def _fetch_with_retry(
    client: redis.Redis, script: _HashScript, requests: Sequence[FeatureRequest], settings: RedisSettings
) -> list[Replies]:
    """One pipelined round trip, retried with backoff; past the retries, EnrichError (``redis.on_error``)."""
    attempt = 0
    while True:
        try:
            replies = _send_and_read(client, script, requests)
            if replies is not None:
                return _parse_replies(requests, replies, script.sha is None)
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


def _send_and_read(client: redis.Redis, script: _HashScript, requests: Sequence[FeatureRequest]) -> list[Any] | None:
    """The raw replies of one pipelined round trip; None when Redis forgot the script (loaded again next time)."""
    sha = script.sha or script.load()
    pipe = client.pipeline(transaction=False)
    for command in _commands(requests, sha):
        pipe.execute_command(*command)
    replies = pipe.execute(raise_on_error=False)  # a failing key or group is rejected, not the worker
    if any(isinstance(reply, redis.exceptions.NoScriptError) for reply in replies):
        script.forget()
        return None
    if any(isinstance(reply, redis.exceptions.NoPermissionError) for reply in replies):
        raise redis.exceptions.NoPermissionError(next(str(r) for r in replies if isinstance(r, Exception)))
    return list(replies)


def _parse_replies(requests: Sequence[FeatureRequest], replies: list[Any], per_key: bool) -> list[Replies]:
    """One Replies per group from the raw replies of _commands (per_key: hashes were read with HMGET per key)."""
    results: list[Replies] = []
    position = 0
    for fields, group_keys in requests:
        width = 1 if fields is None else len(fields)
        if not group_keys:
            results.append(Replies([]))
        elif fields is not None and per_key:  # one HMGET reply (or error) per key
            results.append(_per_key_replies(replies[position : position + len(group_keys)], width))
            position += len(group_keys)
        else:
            results.append(_group_replies(replies[position], fields is None, len(group_keys), width))
            position += 1
    return results


def _per_key_replies(replies: list[Any], width: int) -> Replies:
    """A hash group read with one HMGET per key: its replies joined, a failed key's values None."""
    values: list[Any] = []
    errors: dict[int, Exception] = {}
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            errors[i], reply = reply, [None] * width
        values += reply
    return Replies(values, errors)


def _group_replies(reply: Any, packed: bool, keys: int, width: int) -> Replies:
    """A group's one reply: MGET's values, or HMGET_MANY's flat values and failed keys."""
    if isinstance(reply, Exception):  # every key of the group carries the error: its events are rejected
        return Replies.failed(reply, keys, width)
    if packed:
        return Replies(reply)
    flat, failures = reply
    errors: dict[int, Exception] = {
        int(failures[i]) - 1: redis.ResponseError(failures[i + 1].decode(errors="replace"))
        for i in range(0, len(failures), 2)
    }
    return Replies(flat, errors)
