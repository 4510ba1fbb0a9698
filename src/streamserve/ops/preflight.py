"""What a command settles before it starts work: the local stack's addresses from the environment, servers that
answer within the command's --timeout, files that exist. Each failure is a StreamServeError whose message is one
line naming the server or file and what to do; the CLI prints it and exits 2."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from streamserve.errors import BrokerUnreachable, FileMissing, RedisUnreachable
from streamserve.observe.kafkalog import LIBRDKAFKA_LOGGER

if TYPE_CHECKING:
    import redis

    from streamserve.config import PipelineSettings

STACK_ENV = {"KAFKA_BOOTSTRAP_SERVERS": "STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS", "REDIS_URL": "STREAMSERVE_REDIS__URL"}
"""Variables `scripts/stack env` prints, and the settings they set when the STREAMSERVE_ one is not set."""


def stack_hint(variable: str, tried: str) -> str:
    """What to do when a server does not answer: use the local stack's address when one is recorded in
    stack.env and differs from the one tried, else start the stack."""
    state_dir = Path(os.environ.get("STREAMSERVE_STACK_DIR") or ".stack")
    try:
        lines = (state_dir / "stack.env").read_text().splitlines()
    except OSError:
        lines = []
    recorded = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    value = recorded.get(variable, "").strip()
    if value and value != tried:
        return f"the local stack's is {value} ({state_dir}/stack.env): export $(python3 scripts/stack env)"
    return f"is it running? `scripts/stack up` starts a local one, `scripts/stack env` prints the {variable} to export"


def env_overrides() -> None:
    """Point every pipeline at the local stack when its variables are exported (an explicit STREAMSERVE_ wins)."""
    for source, target in STACK_ENV.items():
        if os.environ.get(source) and target not in os.environ:
            os.environ[target] = os.environ[source]


def _silent_logger() -> logging.Logger:
    """For the preflight's own client: its connection errors end up in the one-line message instead."""
    logger = logging.getLogger(f"{LIBRDKAFKA_LOGGER}.preflight")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    return logger


_BROKER_PREFIX = re.compile(r"^\S+/\S+: ")
_AFTER = re.compile(r"\s*\(after \d+ms in state [^)]*\)")


def _kafka_reason(errors: list[Any], exc: Exception) -> str:
    """The first connection error librdkafka reported, without its broker prefix and state timing."""
    from confluent_kafka import KafkaError

    for error in errors:
        if error.code() != KafkaError._ALL_BROKERS_DOWN:
            return _AFTER.sub("", _BROKER_PREFIX.sub("", error.str()))
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)


def check_kafka(config: Mapping[str, Any], timeout_s: float) -> None:
    """Raise BrokerUnreachable unless a broker answers a metadata request within timeout_s."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[Any] = []
    quiet: dict[str, Any] = {**config, "logger": _silent_logger(), "error_cb": errors.append}
    admin = AdminClient(quiet)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serves error_cb: the connection errors say why
        bootstrap = str(config.get("bootstrap.servers", "?"))
        hint = stack_hint("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        raise BrokerUnreachable(bootstrap, timeout_s, _kafka_reason(errors, exc), hint) from exc


def display_url(url: str) -> str:
    """A URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis(client: redis.Redis, url: str, timeout_s: float) -> None:
    """Raise RedisUnreachable unless Redis answers PING (the client's timeouts should be timeout_s, no retries)."""
    import redis

    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        hint = stack_hint("REDIS_URL", url)
        raise RedisUnreachable(display_url(url), timeout_s, str(exc).rstrip("."), hint) from exc
    except redis.RedisError as exc:  # answered, but refused us (credentials, ACL, protocol)
        hint = "check redis.username/redis.password (or the URL's) and the user's ACL"
        raise RedisUnreachable(display_url(url), timeout_s, f"{type(exc).__name__}: {exc}", hint) from exc


def quick_redis(url: str, timeout_s: float, **options: Any) -> redis.Redis:
    """A client for check_redis: one attempt, bounded by timeout_s."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0), **options
    )


def shown(path: Path) -> str:
    """A path relative to the working directory when it is below it (as the user typed it, mostly)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_file(path: Path, what: str, hint: str) -> None:
    """Raise FileMissing unless path is a readable file."""
    if not path.is_file():
        raise FileMissing(what, shown(path), hint)


def local_model_path(uri: str) -> Path | None:
    """The file of a path or file:// model URI; None for remote URIs."""
    if uri.startswith("file://"):
        return Path(urlsplit(uri).path)
    return None if "://" in uri else Path(uri)


def check_pipeline_files(settings: PipelineSettings) -> None:
    """The schemas and the model file of the config exist."""
    check_file(settings.input.schema_path, "input schema", "fix input.schema in the pipeline config")
    check_file(settings.output.schema_path, "output schema", "fix output.schema in the pipeline config")
    model = local_model_path(settings.model.uri)
    if model is not None:
        check_file(
            model,
            "model file",
            "train or publish a model first - export yours to ONNX at that path (or point model.uri, env"
            " STREAMSERVE_MODEL__URI, at it); for the examples, `make demo` trains theirs into models/",
        )


def check_pipeline_offline(settings: PipelineSettings) -> None:
    """What a worker checks without any server, before a server is asked: the files, and every field the
    pipeline reads against the event schema (a typo in a field is not reported as "Kafka did not answer")."""
    import json

    from streamserve.pipeline.fields import check_event_schema

    check_pipeline_files(settings)
    check_event_schema(json.loads(settings.input.schema_path.read_text()), settings)


def check_pipeline_servers(
    settings: PipelineSettings, timeout_s: float, redis_needed: bool = True, kafka_needed: bool = True
) -> None:
    """Redis (when a feature reads it) answers PING and a Kafka broker answers, each within timeout_s."""
    from streamserve.clients import redis_client

    if redis_needed and any(spec.source == "redis" for spec in settings.features):
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        quick = settings.redis.model_copy(update={"timeout_ms": max(int(timeout_s * 1000), 1)})
        client = redis_client(quick, retry=Retry(NoBackoff(), 0))
        try:
            check_redis(client, settings.redis.url, timeout_s)
        finally:
            client.close()
    if kafka_needed:
        check_kafka(settings.kafka.common(), timeout_s)
