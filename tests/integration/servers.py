"""Finding or starting the real Kafka broker, Redis server and Schema Registry the integration tests talk to.

Order: KAFKA_BOOTSTRAP_SERVERS + REDIS_URL when both are set; testcontainers when a Docker engine
answers; otherwise the project's own native stack (scripts/stack). The Schema Registry likewise, on its own and
only when a registry test runs: SCHEMA_REGISTRY_URL; a testcontainer; `scripts/stack up --registry-only`.
A server that cannot start fails the run with its log tail - never a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "scripts" / "stack"


@dataclass(frozen=True)
class Servers:
    bootstrap_servers: str
    redis_url: str
    origin: str


class ServerStartError(RuntimeError):
    """A server the tests need did not start; the message names it and carries its output."""


def _docker_engine_reachable() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@contextlib.contextmanager
def _native_stack() -> Iterator[Servers]:
    state_dir = Path(os.environ.get("STREAMSERVE_STACK_DIR", REPO / ".stack"))
    already_up = subprocess.run([sys.executable, str(STACK), "status"], capture_output=True).returncode == 0
    result = subprocess.run([sys.executable, str(STACK), "up"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerStartError(
            "scripts/stack up failed (Kafka broker or Redis server did not start):\n"
            + result.stdout[-4000:]
            + result.stderr[-4000:]
        )
    env = _read_env_file(state_dir / "stack.env")
    try:
        yield Servers(env["KAFKA_BOOTSTRAP_SERVERS"], env["REDIS_URL"], "native stack (scripts/stack)")
    finally:
        if not already_up:  # stop only what this run started
            subprocess.run([sys.executable, str(STACK), "down"], capture_output=True)


@contextlib.contextmanager
def _containers() -> Iterator[Servers]:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.redis import RedisContainer

    with KafkaContainer().with_kraft() as kafka, RedisContainer() as redis_container:
        host = redis_container.get_container_host_ip()
        port = redis_container.get_exposed_port(6379)
        yield Servers(kafka.get_bootstrap_server(), f"redis://{host}:{port}/0", "testcontainers")


def warm_up(bootstrap: str, timeout_s: float = 90.0) -> None:
    """Create the broker's internal topics before the first test needs them.

    A fresh broker creates __consumer_offsets on the first group and __transaction_state on the first
    transactional producer; until their coordinators are loaded, group and admin calls answer
    NOT_COORDINATOR. Paying that once here keeps it out of the first test's timing.
    """
    import uuid

    from confluent_kafka import Consumer, KafkaException, Producer

    topic, group = f"streamserve-warmup-{uuid.uuid4().hex[:8]}", f"streamserve-warmup-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": group})
    producer.init_transactions(timeout_s)
    producer.begin_transaction()
    producer.produce(topic, b"warm-up")
    producer.commit_transaction(timeout_s)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout_s
    try:
        msg = None
        while time.monotonic() < deadline:
            if msg is None:
                polled = consumer.poll(0.5)
                msg = polled if polled is not None and polled.error() is None else None
                continue
            try:
                consumer.commit(message=msg, asynchronous=False)
                return
            except KafkaException:  # the group coordinator is still loading
                time.sleep(0.5)
        raise ServerStartError(f"Kafka broker at {bootstrap} started but served no consumer group in {timeout_s}s")
    finally:
        consumer.close()


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """The servers for this test session, started if needed and stopped if this session started them."""
    bootstrap, redis_url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    if bootstrap and redis_url:
        yield Servers(bootstrap, redis_url, "environment")
    elif os.environ.get("STREAMSERVE_TESTS_USE_DOCKER", "auto") != "never" and _docker_engine_reachable():
        with _containers() as found:
            yield found
    else:
        with _native_stack() as found:
            yield found


REGISTRY_REQUEST_TIMEOUT_S = 10.0
"""Each request of the tests' own registry clients (Apicurio answers in milliseconds), tried twice at most: a hung
registry fails a test in about 20 s, not at pytest-timeout's 600 s."""


@dataclass(frozen=True)
class Registry:
    url: str
    """Confluent-compatible API root, e.g. http://127.0.0.1:38081/apis/ccompat/v7."""
    origin: str
    bounce: Callable[[float], float] | None = None
    """Makes the registry unreachable for that many seconds, keeping its schemas; returns the downtime."""

    def client(self) -> Any:
        """A SchemaRegistryClient for a test's own requests (registering, reading predictions back), with a timeout:
        confluent-kafka's client has none unless given one. A request Apicurio does not answer fails the test with
        one line naming Apicurio and its URL."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        from streamserve.pipeline.subjects import no_answer_errors

        conf = {"url": self.url, "timeout": REGISTRY_REQUEST_TIMEOUT_S, "max.retries": 1, "retries.wait.ms": 200}
        client = SchemaRegistryClient(conf)
        rest: Any = client._rest_client  # every request of the client goes through its send_request
        send = rest.send_request

        def send_request(path: str, method: str, body: Any = None, query: Any = None) -> Any:
            started = time.monotonic()
            try:
                return send(path, method, body, query)
            except no_answer_errors() as exc:
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            pytest.fail(  # outside the except: the line alone, without httpx's chain of exceptions
                f"the Schema Registry (Apicurio, {self.origin}) at {self.url} did not answer {method} /{path} "
                f"({reason}; 2 attempts of up to {REGISTRY_REQUEST_TIMEOUT_S:g}s, gave up after "
                f"{time.monotonic() - started:.1f}s): is Apicurio hung? `python3 scripts/stack status --registry-only`"
                ", its log in .stack-registry/registry.log",
                pytrace=False,
            )

        rest.send_request = send_request
        return client


def _native_registry() -> Iterator[Registry]:
    state_dir = Path(os.environ.get("STREAMSERVE_REGISTRY_STACK_DIR", REPO / ".stack-registry"))
    base = [sys.executable, str(STACK), "--state-dir", str(state_dir)]
    already_up = subprocess.run([*base, "status", "--registry-only"], capture_output=True).returncode == 0
    result = subprocess.run([*base, "up", "--registry-only"], capture_output=True, text=True)
    if result.returncode != 0:
        raise ServerStartError(
            "scripts/stack up --registry-only failed (Schema Registry did not start):\n"
            + result.stdout[-4000:]
            + result.stderr[-4000:]
        )

    def bounce(down_for: float) -> float:
        command = [*base, "bounce", "registry", "--registry-only", "--down-for", str(down_for)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerStartError(f"scripts/stack bounce registry failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
        return float(done.stdout.split("downtime:", 1)[1].split("s", 1)[0])

    env = _read_env_file(state_dir / "stack.env")
    try:
        yield Registry(env["SCHEMA_REGISTRY_URL"], "native stack (scripts/stack --registry-only)", bounce)
    finally:
        if not already_up:
            subprocess.run([*base, "down", "--registry-only"], capture_output=True)


def _registry_container() -> Iterator[Registry]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    image = f"apicurio/apicurio-registry:{os.environ.get('STREAMSERVE_REGISTRY_VERSION', '3.3.3')}"
    with DockerContainer(image).with_exposed_ports(8080) as container:
        wait_for_logs(container, "Listening on", timeout=180)
        url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(8080)}/apis/ccompat/v7"

        def bounce(down_for: float) -> float:  # paused, not stopped: a restart would lose the in-memory schemas
            started = time.monotonic()
            container.get_wrapped_container().pause()
            time.sleep(down_for)
            container.get_wrapped_container().unpause()
            return time.monotonic() - started

        yield Registry(url, "testcontainers", bounce)


@contextlib.contextmanager
def registry() -> Iterator[Registry]:
    """The Schema Registry for this session, started if needed and stopped if this session started it."""
    if url := os.environ.get("SCHEMA_REGISTRY_URL"):
        yield Registry(url, "environment")
    elif os.environ.get("STREAMSERVE_TESTS_USE_DOCKER", "auto") != "never" and _docker_engine_reachable():
        yield from _registry_container()
    else:
        yield from _native_registry()
