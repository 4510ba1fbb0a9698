"""A real Prometheus scraping a worker under load agrees with what reached the output topic."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

from streamserve.demo.data import Entities, make_events
from tests.integration.harness import Pipeline, WorkerProcess, predictions, produce_in_background, wait_until
from tests.integration.prometheus import RULES, Prometheus, free_port

EVENTS = 15_000
RATE = 3_000.0  # events per second: about 5 s of load, so Prometheus scrapes the worker while it counts


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def test_prometheus_scrapes_the_counts_of_the_output_topic(
    prometheus_server: Prometheus,
    pipeline_factory: Callable[..., Pipeline],
    entities: Entities,
    tmp_path: Path,
) -> None:
    port = free_port()
    pipeline = pipeline_factory(**{"observe.port": port, "observe.host": "127.0.0.1"})
    only_ours = f'pipeline="{pipeline.name}"'
    prometheus_server.scrape(port, pipeline=pipeline.name)
    worker = WorkerProcess(pipeline.path, tmp_path, "scraped")
    try:

        def worker_ready() -> bool:
            worker.assert_alive()
            return _ready(port)

        wait_until(worker_ready, 60, "the worker's /readyz (model loaded, partitions assigned)")
        prometheus_server.wait_for({f"up{{{only_ours}}}": 1.0}, 30)  # target discovered and scraped

        events = list(make_events(entities, EVENTS, seed=1401))
        producer = produce_in_background(pipeline, events, RATE)
        producer.join(120)
        assert not producer.is_alive(), "the producer did not finish within 120s"
        outputs = predictions(pipeline, len(events), timeout_s=60)
        worker.assert_alive()

        per_event = Counter(prediction["event_id"] for _, prediction in outputs)
        assert set(per_event) == {e["event_id"] for e in events}
        assert max(per_event.values()) == 1, f"duplicated predictions: {per_event.most_common(3)}"

        prometheus_server.wait_for(
            {
                f'sum(streamserve_events_total{{outcome="predicted",{only_ours}}})': float(len(outputs)),
                f"sum(streamserve_record_latency_seconds_count{{{only_ours}}})": float(len(outputs)),
                f"max(streamserve_consumer_lag{{{only_ours}}})": 0.0,
                f"count(streamserve_consumer_lag{{{only_ours}}})": float(pipeline.partitions),
                f"up{{{only_ours}}}": 1.0,
            },
            timeout_s=30,
        )
        assert not prometheus_server.query(f'streamserve_events_total{{outcome="dead_letter",{only_ours}}} > 0')
        # The count grew across scrapes: Prometheus saw the worker while it was working, not only at rest.
        changes = prometheus_server.value(
            f'sum(changes(streamserve_events_total{{outcome="predicted",{only_ours}}}[5m]))'
        )
        assert changes is not None
        assert changes >= 2, f"Prometheus saw the predicted count change {changes} times during the load"

        _assert_alert_rules_loaded_and_evaluated(prometheus_server)
        firing = [a for a in prometheus_server.api("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
        assert not firing, f"alerts fire for a healthy worker: {firing}"
    finally:
        prometheus_server.scrape(None)
        exit_code = worker.stop()
    assert exit_code == 0, f"the worker exited with {exit_code}:\n{worker.log_tail()}"


def _assert_alert_rules_loaded_and_evaluated(prometheus: Prometheus) -> None:
    """Every alert of monitoring/streamserve.rules.yml is loaded and evaluates without error."""
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}

    def rules_health() -> dict[str, str]:
        groups = prometheus.api("/api/v1/rules", type="alert")["groups"]
        return {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}

    assert set(rules_health()) == expected
    wait_until(
        lambda: all(health == "ok" for health in rules_health().values()),
        30,
        "every alert rule evaluated by Prometheus without error",
    )
