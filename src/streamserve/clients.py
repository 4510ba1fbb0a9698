"""Clients built from settings, in one place so TLS and credentials are applied the same way everywhere."""

from __future__ import annotations

from typing import Any

import redis

from streamserve.config import KafkaSettings, RedisSettings
from streamserve.errors import ConfigError


def redis_client(settings: RedisSettings, **overrides: Any) -> redis.Redis:
    """A Redis client for the feature store: the URL plus ACL user, password and TLS files from settings
    (``overrides`` are further redis.Redis options, e.g. the preflight's ``retry``)."""
    timeout_s = settings.timeout_ms / 1000
    options: dict[str, object] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.url.startswith("rediss://"):
        options["ssl_check_hostname"] = settings.ssl_check_hostname
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
            if (path := getattr(settings, name)) is not None:
                options[name] = str(path)
    return redis.Redis.from_url(settings.url, **{**options, **overrides})


def faust_brokers(kafka: KafkaSettings, command: str) -> list[str]:
    """faust's broker list for ``command`` (the monitor, the features app): their aiokafka client speaks plaintext
    Kafka only, so any other ``security.protocol`` is refused rather than silently dropped."""
    protocol = str(kafka.client.get("security.protocol", "plaintext")).lower()
    if protocol != "plaintext":
        raise ConfigError(
            f"{command} connects to plaintext brokers only; kafka.client sets security.protocol={protocol}"
        )
    return [f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",") if server.strip()]
