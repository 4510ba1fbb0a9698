"""What the streaming-features app did, as counts and as Prometheus metrics (served on ``stream_features.port``).

The app's step adds to a ``Counts`` (plain integers, no Prometheus call on the hot path); a collector reads them
at each scrape. They restart at zero with the process (Prometheus' rate() and increase() handle that).

| metric | what |
|---|---|
| ``streamserve_stream_features_events_total`` | input records consumed (decodable or not) |
| ``streamserve_stream_features_aggregates_written_total`` | entity entries sent to Redis |
| ``streamserve_stream_features_stale_writes_total`` | of those, refused by the compare-and-set (Redis held newer) |
| ``streamserve_stream_features_redelivered_total`` | contributions already in the state (redelivered after a restart) |
| ``streamserve_stream_features_dead_letters_total`` | events sent to the dead-letter topic |
| ``streamserve_stream_features_rejections_total{reason}`` | why events (or one of their aggregates) were not used |
| ``streamserve_stream_features_redis_errors_total`` | Redis writes that failed and were retried (the step waits) |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PREFIX = "streamserve_stream_features"


@dataclass(slots=True)
class Counts:
    """What the app did since it started (the progress line and the metrics)."""

    events: int = 0
    redelivered: int = 0
    written: int = 0
    refused: int = 0
    dead_letters: int = 0
    redis_errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class CountsCollector(Collector):
    """The counts as Prometheus counters, read at each scrape."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self.counts
        for name, doc, value in (
            ("events", "input records consumed", counts.events),
            ("aggregates_written", "entity entries sent to Redis", counts.written),
            ("stale_writes", "entries the compare-and-set refused: Redis held a newer one", counts.refused),
            ("redelivered", "contributions already in the state (redelivered)", counts.redelivered),
            ("dead_letters", "events sent to the dead-letter topic", counts.dead_letters),
            ("redis_errors", "Redis writes that failed and were retried", counts.redis_errors),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        rejections = CounterMetricFamily(
            f"{PREFIX}_rejections", "events or aggregates not used, by reason", labels=["reason"]
        )
        for reason, value in sorted(dict(counts.reasons).items()):
            rejections.add_metric([reason], value)
        yield rejections
