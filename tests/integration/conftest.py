"""Session fixtures: the real Kafka broker and Redis server, trained models, per-test namespaces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from streamserve.demo.data import Entities, make_entities
from streamserve.demo.train import TrainedModel, train_versions
from tests.integration.harness import Pipeline
from tests.integration.servers import Servers, ServerStartError, servers


@pytest.fixture(scope="session")
def stack() -> Iterator[Servers]:
    try:
        with servers() as found:
            yield found
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
def pipeline(
    stack: Servers,
    tmp_path: Path,
    models: dict[str, TrainedModel],
    entities: Entities,
    redis_client: redis.Redis,
    request: pytest.FixtureRequest,
) -> Iterator[Pipeline]:
    """A pipeline with its own topics and Redis keys (features of `entities` loaded), cleaned up after."""
    marker = request.node.get_closest_marker("pipeline")
    overrides = dict(marker.kwargs) if marker else {}
    pipe = Pipeline(stack.bootstrap_servers, stack.redis_url, tmp_path, models["v1"].path, overrides=overrides)
    pipe.create_topics()
    writes = redis_client.pipeline(transaction=False)
    for card_id, values in entities.cards.items():
        writes.hset(f"{pipe.prefix}:card:{card_id}", mapping=values)
    for merchant_id, values in entities.merchants.items():
        writes.hset(f"{pipe.prefix}:merchant:{merchant_id}", mapping=values)
    writes.execute()
    yield pipe
    keys = list(redis_client.scan_iter(f"{pipe.prefix}:*", count=1000))
    if keys:
        redis_client.delete(*keys)
