"""Shared fixtures: the real Kafka broker and Redis server, trained models, per-test namespaces.

Tests under tests/integration and tests/faults are marked `integration`; unit tests request none of
these fixtures, so they run without servers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streamserve.demo.data import Entities, make_entities
from streamserve.demo.maintenance import Machines, make_machines
from streamserve.demo.maintenance import TrainedModel as MaintenanceModel
from streamserve.demo.maintenance import train_versions as train_maintenance
from streamserve.demo.train import TrainedModel, train_versions
from tests.integration.harness import Pipeline, WorkerProcess, unique
from tests.integration.maintenance import MaintenancePipeline
from tests.integration.prometheus import Prometheus, prometheus
from tests.integration.servers import Registry, Servers, ServerStartError, registry, servers, warm_up


@pytest.fixture(scope="session")
def stack() -> Iterator[Servers]:
    try:
        with servers() as found:
            warm_up(found.bootstrap_servers)
            yield found
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def schema_registry() -> Iterator[Registry]:
    """The real Schema Registry, started once per session and only when a test asks for it."""
    try:
        with registry() as found:
            yield found
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def prometheus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus with the alert rules loaded, started once per session and only when a test asks for it."""
    try:
        with prometheus(tmp_path_factory.mktemp("prometheus")) as server:
            yield server
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def bootstrap(stack: Servers) -> str:
    return stack.bootstrap_servers


@pytest.fixture(scope="session")
def redis_client(stack: Servers) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def entities() -> Entities:
    return make_entities(n_cards=500, n_merchants=50, seed=3)


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory, entities: Entities) -> dict[str, TrainedModel]:
    trained = train_versions(entities, tmp_path_factory.mktemp("models"), rows=4000)
    return {m.version: m for m in trained}


@pytest.fixture
def pipeline_factory(
    stack: Servers, tmp_path: Path, models: dict[str, TrainedModel], entities: Entities, redis_client: redis.Redis
) -> Iterator[Callable[..., Pipeline]]:
    """Makes pipelines with their own topics and Redis keys (features of `entities` loaded); cleans up after."""
    made: list[Pipeline] = []

    def make(partitions: int = 4, **overrides: Any) -> Pipeline:
        pipe = Pipeline(
            stack.bootstrap_servers,
            stack.redis_url,
            tmp_path,
            models["v1"].path,
            partitions=partitions,
            overrides=overrides,
        )
        pipe.create_topics()
        writes = redis_client.pipeline(transaction=False)
        for card_id, values in entities.cards.items():
            writes.hset(f"{pipe.prefix}:card:{card_id}", mapping=values)
        for merchant_id, values in entities.merchants.items():
            writes.hset(f"{pipe.prefix}:merchant:{merchant_id}", mapping=values)
        writes.execute()
        made.append(pipe)
        return pipe

    yield make
    for pipe in made:
        keys = list(redis_client.scan_iter(f"{pipe.prefix}:*", count=1000))
        if keys:
            redis_client.delete(*keys)


@pytest.fixture
def pipeline(pipeline_factory: Callable[..., Pipeline], request: pytest.FixtureRequest) -> Pipeline:
    """A pipeline of 4 partitions; `@pytest.mark.pipeline(**{"batch.max_batch_size": 64})` overrides keys."""
    marker = request.node.get_closest_marker("pipeline")
    return pipeline_factory(**(dict(marker.kwargs) if marker else {}))


@pytest.fixture(scope="session")
def machines() -> Machines:
    return make_machines(count=120, seed=8, prefix=unique("machine"))


@pytest.fixture(scope="session")
def maintenance_models(tmp_path_factory: pytest.TempPathFactory, machines: Machines) -> dict[str, MaintenanceModel]:
    return {m.version: m for m in train_maintenance(machines, tmp_path_factory.mktemp("maintenance"), rows=2500)}


@pytest.fixture
def maintenance_factory(
    stack: Servers,
    tmp_path: Path,
    maintenance_models: dict[str, MaintenanceModel],
    machines: Machines,
    redis_client: redis.Redis,
) -> Callable[..., MaintenancePipeline]:
    """Makes predictive-maintenance example pipelines: own topics and group, machines loaded into Redis. Override
    values that are text may name the pipeline as ``{name}`` (``"monitor.drift_topic": "{name}-drift"``)."""

    def make(prefix: str = "mt", partitions: int = 4, overrides: dict[str, Any] | None = None) -> MaintenancePipeline:
        name = unique(prefix)
        named = {k: v.format(name=name) if isinstance(v, str) else v for k, v in (overrides or {}).items()}
        pipe = MaintenancePipeline(
            stack.bootstrap_servers,
            stack.redis_url,
            tmp_path,
            maintenance_models["v1"].path,
            partitions=partitions,
            overrides=named,
            name=name,
        )
        pipe.create_topics()
        pipe.load_machines(redis_client, machines)
        return pipe

    return make


@pytest.fixture
def example(maintenance_factory: Callable[..., MaintenancePipeline]) -> MaintenancePipeline:
    """The predictive-maintenance example pipeline: own topics and group, machines loaded into Redis."""
    return maintenance_factory()


def _from_pytest(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


@pytest.fixture(autouse=True)
def _process_state_restored() -> Iterator[None]:
    """What a test changes in the process beyond its fixtures is undone after it: the environment (an in-process
    demo sets STREAMSERVE_* overrides for its run), the loggers' levels and the root handlers (`setup_logging`
    replaces them). Without this, one test's demo reroutes every later test's topics, Redis or log lines."""
    environment = dict(os.environ)
    root = logging.getLogger()
    root_handlers, root_level = [h for h in root.handlers if not _from_pytest(h)], root.level
    loggers = {
        name: (logger.level, logger.propagate, logger.disabled, list(logger.handlers))
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    placeholders = {name for name, logger in logging.root.manager.loggerDict.items() if name not in loggers}
    yield
    if os.environ != environment:
        os.environ.clear()
        os.environ.update(environment)
    for handler in [h for h in root.handlers if not _from_pytest(h) and h not in root_handlers]:
        root.removeHandler(handler)
    for handler in [h for h in root_handlers if h not in root.handlers]:
        root.addHandler(handler)
    root.setLevel(root_level)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger):
            continue
        if name in placeholders:  # a parent ("streamserve") the test made a logger of, e.g. to set its level
            logger.setLevel(logging.NOTSET)
            continue
        if name not in loggers:  # new: configured by its own import
            continue
        level, propagate, disabled, handlers = loggers[name]
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled
        logger.handlers[:] = handlers


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    """Kill the worker processes a test started and did not stop (e.g. when an assertion failed first)."""
    yield
    while WorkerProcess.running:
        worker = WorkerProcess.running.pop()
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait(10)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the fault-injection table (and write it to $STREAMSERVE_FAULT_REPORT when set)."""
    faults = sys.modules.get("tests.faults.test_faults")
    table = faults.report_table() if faults is not None and faults.REPORT else ""
    if table:
        terminalreporter.write_sep("=", "fault-injection results")
        terminalreporter.write_line(table)
        if os.environ.get("STREAMSERVE_FAULT_REPORT"):
            Path(os.environ["STREAMSERVE_FAULT_REPORT"]).write_text(table + "\n")


INTEGRATION_DIRS = ("integration", "faults", "secure")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(part in INTEGRATION_DIRS for part in Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.integration)
