"""The lag exporter serves what the alert rules query: the broker's view of the group, one read per scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from streamserve.ops.lagexport import GroupLag, LagCollector, PartitionLag
from tests.deploy.test_monitoring import BROKER_METRICS, exported_families, referenced_metrics


class Reads:
    """A broker view the test sets; counts the reads."""

    def __init__(self, state: GroupLag) -> None:
        self.state, self.reads = state, 0

    def read(self) -> GroupLag:
        self.reads += 1
        return self.state


def test_every_broker_metric_the_rules_query_is_served_once_per_scrape() -> None:
    state = GroupLag("scorers", 0, [PartitionLag("tx", 0, 500, None, 500), PartitionLag("tx", 1, 90, 40, 50)])
    source = Reads(state)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LagCollector(source))  # type: ignore[arg-type]
    scrape = generate_latest(registry).decode()
    assert source.reads == 1, "a fresh read per scrape, nothing cached"
    queried = {name for name in referenced_metrics() if name.startswith(BROKER_METRICS)}
    assert queried, "the rules query the broker's lag"
    assert queried <= exported_families(scrape)
    assert 'streamserve_broker_lag{group="scorers",partition="0",topic="tx"} 500.0' in scrape
    assert 'streamserve_broker_committed_offset{group="scorers",partition="1",topic="tx"} 40.0' in scrape
    assert 'streamserve_broker_committed_offset{group="scorers",partition="0"' not in scrape, "nothing committed"
    assert 'streamserve_broker_group_members{group="scorers"} 0.0' in scrape
