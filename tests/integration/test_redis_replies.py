"""Hash features read from a real Redis give the same columns and rejections whichever way they are read: one
EVALSHA per key template, the script reloaded after the server forgot it (SCRIPT FLUSH), or one HMGET per key
for a user that may not run scripts. Keys that are not hashes reject only their own events."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from streamserve.config import FeatureSpec, RedisSettings
from streamserve.pipeline.features import HMGET_MANY, FeatureBuilder, redis_fetcher
from streamserve.records import Event, FeatureBatch, Source
from tests.integration.servers import Servers

NOW_MS = time.time() * 1000
USERS: dict[str, dict[str, Any] | str | None] = {  # a hash, a string (not a hash) or nothing at all
    "u0": {"score": "0.25", "visits": "3", "tier": "gold"},
    "u1": {"score": "-7.5e3", "visits": str(2**62), "tier": "ünïcode 🚀"},
    "u2": {"score": "nan", "visits": "0"},  # NaN stored: the default; no tier: the default
    "u3": "not a hash",
    "u4": None,  # missing: score and tier take their defaults, visits has none
    "u5": {"score": "1e-300", "visits": "-1", "tier": ""},
}
REGIONS: dict[str, dict[str, Any] | str | None] = {
    "r0": {"risk": "0.9", "ts": str(NOW_MS - 1_000)},
    "r1": {"risk": "0.8", "ts": str(NOW_MS - 3_600_000)},  # stale: the default
    "r2": "also not a hash",
    "r3": {"risk": "0.1"},  # no stamp: cannot be proven fresh, the default
}


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"replies-{uuid.uuid4().hex[:8]}:"
    for kind, entities in (("user", USERS), ("region", REGIONS)):
        for name, value in entities.items():
            if isinstance(value, dict):
                redis_client.hset(f"{prefix}{kind}:{name}", mapping=value)
            elif isinstance(value, str):
                redis_client.set(f"{prefix}{kind}:{name}", value)
    yield prefix
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)


@pytest.fixture
def noscripts(redis_client: redis.Redis, stack: Servers) -> Iterator[redis.Redis]:
    """A client of an ACL user that may do anything but run scripts."""
    user, password = f"noscripts-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], categories=["+@all", "-@scripting"]
    )
    client = redis.Redis.from_url(stack.redis_url, username=user, password=password)
    yield client
    client.close()
    redis_client.acl_deluser(user)


def specs(prefix: str) -> list[FeatureSpec]:
    user = f"{prefix}user:{{user}}"
    return [
        FeatureSpec(name="score", source="redis", key=user, field="score", dtype="float64", default=-1.0),
        FeatureSpec(name="visits", source="redis", key=user, field="visits", dtype="int64"),
        FeatureSpec(name="tier", source="redis", key=user, field="tier", dtype="string", default="none"),
        FeatureSpec(
            name="risk",
            source="redis",
            key=f"{prefix}region:{{region}}",
            field="risk",
            dtype="float64",
            default=0.5,
            max_age_s=60,
            updated_at_field="ts",
        ),
    ]


def events() -> list[Event]:
    pairs = [(u, r) for u in USERS for r in REGIONS] + [("u0", "r0"), (None, "r0"), ("u1", None)]
    return [Event(Source("in", 0, i, None, b"", None, 0), {"user": u, "region": r}) for i, (u, r) in enumerate(pairs)]


def expected(batch_events: list[Event]) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Per offset, the feature values or the word its rejection must name; worked out from USERS and REGIONS."""
    values, rejected = {}, {}
    for event in batch_events:
        user, region = USERS.get(event.fields["user"]), REGIONS.get(event.fields["region"])
        offset = event.source.offset
        if isinstance(user, str) or isinstance(region, str):
            rejected[offset] = "WRONGTYPE"
        elif user is None or "visits" not in user:
            rejected[offset] = "'visits': missing"
        else:
            score = float(user["score"])
            fresh = isinstance(region, dict) and "ts" in region and float(region["ts"]) >= NOW_MS - 60_000
            values[offset] = {
                "score": -1.0 if np.isnan(score) else score,
                "visits": int(user["visits"]),
                "tier": user.get("tier", "none"),
                "risk": float(region["risk"]) if region and fresh else 0.5,
            }
    return values, rejected


def check(batch: FeatureBatch, batch_events: list[Event]) -> None:
    values, rejected = expected(batch_events)
    assert {r.source.offset: r.message for r in batch.rejected}.keys() == rejected.keys()
    for r in batch.rejected:
        assert rejected[r.source.offset] in r.message, r.message
    assert [e.source.offset for e in batch.events] == list(values)
    for name in ("score", "visits", "tier", "risk"):
        assert batch.columns[name].tolist() == [values[e.source.offset][name] for e in batch.events], name
    assert batch.columns["visits"].dtype == np.int64  # 2**62 exactly


def calls(client: redis.Redis, command: str) -> int:
    """How often the server ran a command (INFO commandstats), so a test knows which read path was taken."""
    return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def build(client: redis.Redis, prefix: str, batch_events: list[Event]) -> FeatureBatch:
    settings = RedisSettings(url="redis://unused", retries=0)
    return FeatureBuilder(specs(prefix), redis_fetcher(client, settings), clock_ms=lambda: NOW_MS).build(batch_events)


def test_one_script_per_key_template(redis_client: redis.Redis, store: str) -> None:
    batch_events = events()
    before = calls(redis_client, "evalsha")
    check(build(redis_client, store, batch_events), batch_events)
    assert calls(redis_client, "evalsha") == before + 2  # one per key template (its HMGETs run inside Lua)


def test_a_script_the_server_forgot_is_loaded_again(redis_client: redis.Redis, store: str) -> None:
    batch_events = events()
    settings = RedisSettings(url="redis://unused", retries=0)
    builder = FeatureBuilder(specs(store), redis_fetcher(redis_client, settings), clock_ms=lambda: NOW_MS)
    check(builder.build(batch_events), batch_events)
    redis_client.script_flush()
    check(builder.build(batch_events[::-1]), batch_events[::-1])
    assert redis_client.script_exists(hashlib.sha1(HMGET_MANY.encode()).hexdigest()) == [True]  # loaded again


def test_a_user_without_scripts_reads_one_hmget_per_key(
    redis_client: redis.Redis, noscripts: redis.Redis, store: str
) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        noscripts.script_load("return 1")  # this user really may not run scripts
    batch_events = events()
    before = calls(redis_client, "evalsha"), calls(redis_client, "hmget")
    check(build(noscripts, store, batch_events), batch_events)
    distinct = len({e.fields["user"] for e in batch_events} - {None}) + len(
        {e.fields["region"] for e in batch_events} - {None}
    )
    assert (calls(redis_client, "evalsha"), calls(redis_client, "hmget")) == (before[0], before[1] + distinct)


# --- a lookup sent ahead (RedisFetcher.start): the same columns, one round trip, and every failure recovered --------


def ahead(client: redis.Redis, prefix: str) -> FeatureBuilder:
    """A builder whose fetcher has loaded its script (the first lookup of a worker is a plain one)."""
    fetcher = redis_fetcher(client, RedisSettings(url="redis://unused", retries=0))
    builder = FeatureBuilder(specs(prefix), fetcher, clock_ms=lambda: NOW_MS, start_fetch=fetcher.start)
    check(builder.build(events()), events())
    return builder


def in_use(client: redis.Redis) -> int:
    return len(client.connection_pool._in_use_connections)  # type: ignore[attr-defined]


def test_a_lookup_sent_ahead_gives_the_same_columns_with_one_round_trip(redis_client: redis.Redis, store: str) -> None:
    builder = ahead(redis_client, store)
    batch_events = events()
    before = calls(redis_client, "evalsha")
    pending = builder.start_lookup(batch_events)
    deadline = time.monotonic() + 5
    while calls(redis_client, "evalsha") < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls(redis_client, "evalsha") == before + 2, "the scripts ran before the batch asked for their replies"
    check(builder.build(batch_events, pending=pending), batch_events)
    assert calls(redis_client, "evalsha") == before + 2, "building read the replies sent ahead, nothing more"
    assert in_use(redis_client) == 0, "the connection went back to the pool"


def test_a_lookup_sent_ahead_survives_a_forgotten_script_and_a_killed_connection(
    redis_client: redis.Redis, store: str, caplog: pytest.LogCaptureFixture
) -> None:
    builder = ahead(redis_client, store)
    batch_events = events()[::-1]
    redis_client.script_flush()  # the worker's SHA is stale: the replies sent ahead are NOSCRIPT errors
    pending = builder.start_lookup(batch_events)
    check(builder.build(batch_events, pending=pending), batch_events)
    assert redis_client.script_exists(hashlib.sha1(HMGET_MANY.encode()).hexdigest()) == [True]

    redis_client.client_pause(5_000, all=False)  # scripts wait (a WRITE pause); CLIENT KILL does not
    try:
        pending = builder.start_lookup(batch_events)
        (connection,) = redis_client.connection_pool._in_use_connections  # type: ignore[attr-defined]
        host, port = connection._sock.getsockname()[:2]
        assert redis_client.client_kill(f"{host}:{port}")  # the lookup's connection dies before it is answered
    finally:
        redis_client.client_unpause()
    with caplog.at_level(logging.INFO, logger="streamserve.pipeline.features.redis"):
        check(builder.build(batch_events, pending=pending), batch_events)
    assert "lookup started ahead failed" in caplog.text, "the replies were lost with the connection: fetched again"
    assert in_use(redis_client) == 0


def test_a_lookup_sent_ahead_for_other_events_is_cancelled(redis_client: redis.Redis, store: str) -> None:
    builder = ahead(redis_client, store)
    batch_events = events()
    pending = builder.start_lookup(batch_events)
    assert in_use(redis_client) == 1
    others = batch_events[:5]  # e.g. a revoked partition's records left the batch
    check(builder.build(others, pending=pending), others)
    assert in_use(redis_client) == 0, "the unread replies' connection was closed and given back"
    check(builder.build(batch_events), batch_events)  # the pool goes on serving


def test_a_user_without_scripts_sends_its_hmgets_ahead(
    redis_client: redis.Redis, noscripts: redis.Redis, store: str
) -> None:
    builder = ahead(noscripts, store)  # learns that scripts are refused
    batch_events = events()
    before = calls(redis_client, "hmget")
    pending = builder.start_lookup(batch_events)
    check(builder.build(batch_events, pending=pending), batch_events)
    distinct = len({e.fields["user"] for e in batch_events} - {None}) + len(
        {e.fields["region"] for e in batch_events} - {None}
    )
    assert calls(redis_client, "hmget") == before + distinct
