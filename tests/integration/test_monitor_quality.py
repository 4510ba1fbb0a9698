"""`streamserve monitor` on the real broker: quality from delayed labels equals scikit-learn's on the same joined
pairs, also across a SIGKILL of the monitor mid-stream; bad labels are counted and dead-lettered and skew
nothing; a canary or shadow version is named better when it is, "not yet distinguishable" when it is not."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from streamserve.monitor import labels
from tests.deploy.test_monitoring import exported_families, referenced_metrics
from tests.integration.harness import headers_of, read_topic, wait_until
from tests.integration.monitoring import (
    HOUR_MS,
    T0,
    Event,
    MonitorProcess,
    Stream,
    binary_events,
    monitor_pipeline,
    produce_in_time_order,
    version_row,
    wait_for_report,
)
from tests.integration.servers import Servers

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_monitor_left_behind() -> Iterator[None]:
    yield
    MonitorProcess.stop_all()


def _expected_classifier(pairs: list[tuple[str, float]]) -> dict[str, float]:
    y = np.array([int(t) for t, _ in pairs])
    s = np.array([p for _, p in pairs])
    predicted = (s >= 0.5).astype(int)
    return {
        "accuracy": skm.accuracy_score(y, predicted),
        "precision": skm.precision_score(y, predicted),
        "recall": skm.recall_score(y, predicted),
        "f1": skm.f1_score(y, predicted),
        "roc_auc": skm.roc_auc_score(y, s),
        "log_loss": skm.log_loss(y, s),
        "brier": skm.brier_score_loss(y, s),
    }


def _dead_letters(bootstrap: str, topic: str, expected: int) -> dict[str, set[bytes]]:
    by_reason: dict[str, set[bytes]] = {}
    for msg in read_topic(bootstrap, topic, expected, timeout_s=60, settle_s=2.0):
        stage = headers_of(msg)["streamserve.dlq.stage"].decode()
        by_reason.setdefault(stage.removeprefix("monitor."), set()).add(msg.value() or b"")
    return by_reason


def test_quality_equals_sklearn_across_a_sigkill_with_bad_labels(stack: Servers, tmp_path: Path) -> None:
    pipe = monitor_pipeline(stack.bootstrap_servers, stack.redis_url, tmp_path)
    settings = pipe.settings
    stream = Stream(settings, stack.bootstrap_servers)
    rng = np.random.default_rng(17)
    live, shadow = ("fraud", "v1", "main"), ("fraud", "v2", "shadow")
    events = binary_events(1200, 7, T0, {live: 1.2, shadow: 2.5})
    items: list[tuple[int, int, Any]] = []
    valid: dict[str, Event] = {}
    bad: dict[str, set[bytes]] = {"wrong_type": set(), "duplicate": set(), "unknown_event": set(), "undecodable": set()}

    def send_label(event_id: str, value: Any, at: int, reason: str | None = None) -> None:
        data = labels.encode(event_id, value, at)
        if reason:
            bad[reason].add(data)
        items.append((at, 2, lambda: stream.raw_label(data, event_id.encode())))

    for i, event in enumerate(events):
        items.append((event.time_ms, 1, lambda e=event: (stream.prediction(e, *live), stream.prediction(e, *shadow))))
        roll = rng.random()
        if roll < 0.12:
            continue  # never labelled
        if roll < 0.14:
            send_label(event.event_id, "banana", event.time_ms + 60_000, "wrong_type")  # no such class: rejected
            continue
        lag = int(rng.integers(60_000, 100 * 60_000))  # up to 100 minutes: many after the window's end
        at = event.time_ms - 1 if i % 20 == 0 else event.time_ms + lag  # some labels come before the prediction
        if i % 40 == 1:
            send_label(event.event_id, 0.5, at - 1, "wrong_type")  # a fraction for a classifier
        if i % 60 == 2:
            send_label(event.event_id, None, at - 1, "wrong_type")
        send_label(event.event_id, int(event.truth) if i % 2 else event.truth, at)  # 1 and "1" are one class
        event.label_time_ms = at
        valid[event.event_id] = event
        if i % 37 == 3:
            send_label(event.event_id, 1 - int(event.truth), at + 1000, "duplicate")  # the first label counts
    for k in range(25):
        send_label(f"ghost-{k}", "1", T0 + k * 60_000, "unknown_event")
    garbage = [bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)) for _ in range(15)]
    garbage += [labels.encode(f"cut-{k}", "1", T0)[:-3] for k in range(5)] + [labels.encode("x", "1", T0) + b"\x00"]
    for k, data in enumerate(garbage):
        bad["undecodable"].add(data)
        items.append((T0 + k * 100_000, 3, lambda d=data: stream.raw_label(d)))

    cut = T0 + 40 * 60_000
    produce_in_time_order(stream, [item for item in items if item[0] < cut])
    monitor = MonitorProcess(pipe.path, tmp_path)
    wait_for_report(
        stack.bootstrap_servers,
        settings.monitor.quality_topic,
        "fraud",
        T0,
        monitor,
        lambda r: any(v["version"] == "v1" and v["labelled"] >= 100 for v in r["versions"]),
    )
    monitor.kill()  # SIGKILL mid-stream: no drain, no commit of what it read since the last one
    produce_in_time_order(stream, [item for item in items if item[0] >= cut])
    stream.ticks(T0 + 4 * HOUR_MS)  # every partition's clock past the window's end plus the label TTL
    stream.ticks(T0 + 7 * HOUR_MS)  # ... and past the ghost labels' TTL
    stream.flush()
    # Restarted as two processes of one group: each joins its share of the 4 by-event partitions (from the
    # changelog the killed one left), the owner of partition 0 reports from every partition's changelog.
    restarted, second = MonitorProcess(pipe.path, tmp_path), MonitorProcess(pipe.path, tmp_path)
    report = wait_for_report(
        stack.bootstrap_servers, settings.monitor.quality_topic, "fraud", T0, restarted, lambda r: r["final"], 180
    )

    window_end = T0 + HOUR_MS
    for ident, role in ((live, "live"), (shadow, "shadow")):
        row = version_row(report, ident[1], role)
        pairs = [(e.truth, e.predictions[ident]["score"]) for e in valid.values()]
        assert row["predictions"] == len(events)
        assert row["labelled"] == len(valid), "a pair counted twice or lost"
        assert row["never_labelled"] == len(events) - len(valid)
        assert row["pending"] == 0
        assert row["late"] == sum(1 for e in valid.values() if (e.label_time_ms or 0) >= window_end)
        for name, value in _expected_classifier(pairs).items():
            assert row[name] == pytest.approx(value, abs=1e-9), (role, name)
        assert row["status"] == "measured"
        assert row["estimated_accuracy"] is not None
    comparison = report["comparisons"][0]
    assert (comparison["kind"], comparison["method"], comparison["better"]) == ("paired", "delong", "v2 (shadow)")

    found = _dead_letters(stack.bootstrap_servers, settings.labels_dead_letter_topic, sum(map(len, bad.values())))
    for reason, values in bad.items():
        assert found.get(reason, set()) == values, reason
    restarted.assert_alive()
    second.assert_alive()
    joined = [_counted(m.metrics(), "streamserve_monitor_pairs_total", 'outcome="joined"') for m in (restarted, second)]
    assert all(joined), f"the join was not split between the two processes: pairs joined by each {joined}"
    reported = [_counted(m.metrics(), "streamserve_monitor_reports_total") for m in (restarted, second)]
    assert sorted(count > 0 for count in reported) == [False, True], f"reports written by each process: {reported}"


def _counted(metrics: str, name: str, label: str = "") -> float:
    """The sum of a counter's series (those with ``label``) in a /metrics text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith(name) and (not label or label in line)
    )


def _reporting(monitors: tuple[MonitorProcess, ...]) -> list[MonitorProcess]:
    """The processes whose reporter runs now: the last reporter line of their log says it reads."""
    found = []
    for monitor in monitors:
        log = monitor.log_path.read_text(errors="replace").splitlines()
        lines = [line for line in log if "monitor reporter:" in line]
        if lines and "stopped" not in lines[-1]:
            found.append(monitor)
    return found


def test_the_reports_go_on_when_the_reporting_process_is_killed(stack: Servers, tmp_path: Path) -> None:
    """Two processes split the join; the one reporting (it owns by-event partition 0) is SIGKILLed mid-stream:
    the other takes partition 0 over, reads every partition's changelog, and the final report equals
    scikit-learn's on every pair, none lost, none twice. ``idle_s`` is longer than the group takes to notice the
    death (faust's 10 s session) and hand its partitions over: the dead process's input partitions go quiet
    meanwhile, and a quiet source must not let the survivor's clocks expire entries still to come."""
    pipe = monitor_pipeline(stack.bootstrap_servers, stack.redis_url, tmp_path, idle_s=30)
    settings = pipe.settings
    stream = Stream(settings, stack.bootstrap_servers)
    live = ("fraud", "v1", "main")
    events = binary_events(800, 11, T0, {live: 1.5})
    items: list[tuple[int, int, Any]] = []
    for event in events:
        items.append((event.time_ms, 1, lambda e=event: stream.prediction(e, *live)))
        at = event.time_ms + 10 * 60_000
        items.append((at, 2, lambda e=event, at=at: stream.label(e.event_id, e.truth, at)))
    cut = T0 + 30 * 60_000
    produce_in_time_order(stream, [item for item in items if item[0] < cut])
    monitors = (MonitorProcess(pipe.path, tmp_path), MonitorProcess(pipe.path, tmp_path))
    wait_for_report(
        stack.bootstrap_servers,
        settings.monitor.quality_topic,
        "fraud",
        T0,
        monitors[0],
        lambda r: version_row(r, "v1", "live")["labelled"] >= 100,
    )
    wait_until(lambda: len(_reporting(monitors)) == 1, 60, "one reporting monitor process")
    (reporter,) = _reporting(monitors)
    survivor = monitors[1] if reporter is monitors[0] else monitors[0]
    reporter.kill()
    produce_in_time_order(stream, [item for item in items if item[0] >= cut])
    stream.ticks(T0 + 4 * HOUR_MS)  # every partition's clock past the window's end plus the label TTL
    stream.flush()
    report = wait_for_report(
        stack.bootstrap_servers, settings.monitor.quality_topic, "fraud", T0, survivor, lambda r: r["final"], 180
    )
    row = version_row(report, "v1", "live")
    assert (row["predictions"], row["labelled"], row["never_labelled"], row["pending"]) == (800, 800, 0, 0)
    expected = _expected_classifier([(e.truth, e.predictions[live]["score"]) for e in events])
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, abs=1e-9), name
    assert _reporting((survivor,)) == [survivor]
    assert _counted(survivor.metrics(), "streamserve_monitor_reports_total", 'final="true"') >= 1
    survivor.assert_alive()


def test_canary_named_better_and_equal_versions_undistinguishable(stack: Servers, tmp_path: Path) -> None:
    pipe = monitor_pipeline(stack.bootstrap_servers, stack.redis_url, tmp_path, min_labels=100)
    settings = pipe.settings
    stream = Stream(settings, stack.bootstrap_servers)
    items: list[tuple[int, int, Any]] = []
    truth: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for model, strengths in (("fraud", (1.0, 3.5)), ("twin", (2.0, 2.0))):
        events = binary_events(1600, 5 if model == "fraud" else 6, T0, {}, prefix=model)
        rng = np.random.default_rng(7 if model == "twin" else 5)  # seeds fixed: 5% of equal pairs differ by chance
        for event in events:
            canary = rng.random() < 0.25  # the canary's share of the keys
            version = "b" if canary else "a"
            strength = strengths[1] if canary else strengths[0]
            p = float(np.round(1 / (1 + np.exp(-(strength * (int(event.truth) - 0.5) + rng.normal(0, 1)))), 3))
            event.predictions[(model, version, "main")] = {"score": p, "predicted_class": str(int(p >= 0.5))}
            truth.setdefault((model, version), []).append((event.truth, p))
            items.append((event.time_ms, 1, lambda e=event, v=version, m=model: stream.prediction(e, m, v, "main")))
            at = event.time_ms + 5 * 60_000
            items.append((at, 2, lambda e=event, at=at: stream.label(e.event_id, e.truth, at)))
    produce_in_time_order(stream, items)
    stream.ticks(T0 + 4 * HOUR_MS)
    monitor = MonitorProcess(pipe.path, tmp_path)
    topic = settings.monitor.quality_topic
    fraud = wait_for_report(stack.bootstrap_servers, topic, "fraud", T0, monitor, lambda r: r["final"])
    twin = wait_for_report(stack.bootstrap_servers, topic, "twin", T0, monitor, lambda r: r["final"])

    for report, model in ((fraud, "fraud"), (twin, "twin")):
        for version, role in (("a", "live"), ("b", "canary")):
            row = version_row(report, version, role)
            expected = _expected_classifier(truth[(model, version)])
            assert row["labelled"] == len(truth[(model, version)])
            assert row["roc_auc"] == pytest.approx(expected["roc_auc"], abs=1e-9)
            assert row["f1"] == pytest.approx(expected["f1"], abs=1e-9)
    (better,) = fraud["comparisons"]
    assert (better["kind"], better["better"], better["verdict"]) == ("unpaired", "b (canary)", "candidate better")
    (same,) = twin["comparisons"]
    assert same["verdict"] == "not yet distinguishable"
    assert same["better"] is None

    scrape = monitor.metrics()
    missing = referenced_metrics(monitor=True) - exported_families(scrape)
    assert not missing, f"the dashboard or the alert rules query metrics the monitor does not export: {missing}"
    assert 'streamserve_quality_comparison_verdict{baseline="a (live)",candidate="b (canary)"' in scrape
    assert 'streamserve_quality_floor{metric="roc_auc",model="fraud"} 0.8' in scrape

    shown = subprocess.run(
        [sys.executable, "-m", "streamserve", "models", "quality", "-c", str(pipe.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=dict(os.environ),
    ).stdout
    assert "b (canary) vs a (live), unpaired, roc_auc" in shown
    assert "-> b (canary) is better" in shown
    assert "-> not yet distinguishable" in shown


def test_regressor_mae_rmse_equal_sklearn(stack: Servers, tmp_path: Path) -> None:
    pipe = monitor_pipeline(stack.bootstrap_servers, stack.redis_url, tmp_path, task="regression", min_labels=20)
    settings = pipe.settings
    stream = Stream(settings, stack.bootstrap_servers)
    rng = np.random.default_rng(23)
    items: list[tuple[int, int, Any]] = []
    pairs: dict[str, list[tuple[float, float]]] = {"v1": [], "v2": []}
    for i in range(500):
        value = float(rng.normal(100, 20))
        event = Event(f"r-{i}", T0 + i * 7000, f"m-{i % 40}", value)
        for version, role, noise in (("v1", "main", 8.0), ("v2", "shadow", 3.0)):
            score = value + float(rng.normal(0, noise))
            event.predictions[("energy", version, role)] = {"score": score}
            if i % 10:
                pairs[version].append((value, score))
            items.append((event.time_ms, 1, lambda e=event, v=version, r=role: stream.prediction(e, "energy", v, r)))
        if i % 10:
            at = event.time_ms + 30 * 60_000
            items.append((at, 2, lambda e=event, at=at: stream.label(e.event_id, e.truth, at)))
        elif i % 20 == 0:
            items.append((event.time_ms, 2, lambda e=event: stream.label(e.event_id, "high", e.time_ms)))  # wrong type
    produce_in_time_order(stream, items)
    stream.ticks(T0 + 4 * HOUR_MS, model="other", label=1.0)
    monitor = MonitorProcess(pipe.path, tmp_path)
    report = wait_for_report(
        stack.bootstrap_servers, settings.monitor.quality_topic, "energy", T0, monitor, lambda r: r["final"]
    )
    for version, role in (("v1", "live"), ("v2", "shadow")):
        row = version_row(report, version, role)
        true = np.array([t for t, _ in pairs[version]])
        predicted = np.array([p for _, p in pairs[version]])
        assert row["labelled"] == len(true)
        assert row["never_labelled"] == 50
        assert row["mae"] == pytest.approx(skm.mean_absolute_error(true, predicted), abs=1e-9)
        assert row["rmse"] == pytest.approx(skm.root_mean_squared_error(true, predicted), abs=1e-9)
    (comparison,) = report["comparisons"]
    assert (comparison["metric"], comparison["better"]) == ("mae", "v2 (shadow)")
    dead = read_topic(stack.bootstrap_servers, settings.labels_dead_letter_topic, 25, settle_s=0.5)
    assert {headers_of(m)["streamserve.dlq.stage"] for m in dead} == {b"monitor.wrong_type"}
    assert len(dead) == 25
