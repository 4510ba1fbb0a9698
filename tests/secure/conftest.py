"""The secured local stack (scripts/stack up --secure): SASL_SSL Kafka with ACLs, Redis over TLS with ACL users.

It runs beside the plain stack (own ports and state dir), is started once per session when a test asks for
it, and is stopped at the end when this session started it. It never skips: a server that cannot start
fails the test with the stack's output, which names the server.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from streamserve.clients import redis_client
from streamserve.config import RedisSettings
from tests.integration.servers import STACK


@dataclass(frozen=True)
class SecureStack:
    """Addresses, credentials and certificate paths of the secured stack (its stack.env)."""

    env: dict[str, str]

    @property
    def bootstrap(self) -> str:
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    @property
    def redis_url(self) -> str:
        return self.env["REDIS_URL"]

    def password(self, server: str, user: str) -> str:
        return self.env[f"{server.upper()}_{user.upper()}_PASSWORD"]

    def kafka_client(self, user: str) -> dict[str, Any]:
        """The `kafka.client` settings of `user` (the password goes in kafka.sasl_password)."""
        return {
            "security.protocol": self.env["KAFKA_SECURITY_PROTOCOL"],
            "sasl.mechanism": self.env["KAFKA_SASL_MECHANISM"],
            "sasl.username": self.env[f"KAFKA_{user.upper()}_USERNAME"],
            "ssl.ca.location": self.env["KAFKA_SSL_CA_LOCATION"],
        }

    def kafka_config(self, user: str) -> dict[str, Any]:
        """A complete librdkafka config for `user`."""
        return {
            "bootstrap.servers": self.bootstrap,
            **self.kafka_client(user),
            "sasl.password": self.password("kafka", user),
        }

    def redis_settings(self, user: str) -> dict[str, Any]:
        """The `redis` settings section of `user`."""
        return {
            "url": self.redis_url,
            "username": self.env[f"REDIS_{user.upper()}_USERNAME"],
            "password": self.password("redis", user),
            "ssl_ca_certs": self.env["REDIS_SSL_CA_CERTS"],
            "ssl_certfile": self.env["REDIS_SSL_CERTFILE"],
            "ssl_keyfile": self.env["REDIS_SSL_KEYFILE"],
        }


def _stack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(STACK), *args, "--secure"], capture_output=True, text=True)


@pytest.fixture(scope="session")
def secure_stack() -> Iterator[SecureStack]:
    already_up = _stack("status").returncode == 0
    started = _stack("up")
    if started.returncode != 0:
        pytest.fail(
            "scripts/stack up --secure failed (the SASL_SSL Kafka broker or the TLS Redis server did not start):\n"
            + started.stdout[-4000:]
            + started.stderr[-4000:],
            pytrace=False,
        )
    printed = _stack("env")
    env = dict(line.split("=", 1) for line in printed.stdout.splitlines() if "=" in line)
    try:
        yield SecureStack(env)
    finally:
        if not already_up:  # stop only what this session started
            _stack("down")


@pytest.fixture(scope="session")
def secure_redis_admin(secure_stack: SecureStack) -> Iterator[redis.Redis]:
    client = redis_client(RedisSettings(**secure_stack.redis_settings("admin")))
    yield client
    client.close()
