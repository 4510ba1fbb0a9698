"""Throughput sized by time: every system is measured over a window of at least `min_window_seconds`.

A system works through the shared backlog (the events topic, read from its beginning by a fresh group).
The window opens `settle_seconds` after the consumer group is stable with every member and the first output
has appeared, so joins and rebalances stay out of it; it closes `min_window_seconds` + 1 s later, or earlier
when the backlog is nearly drained (the last 5% drain unevenly across partitions and are left out).
Outputs are counted from the output topic's watermarks, so a window of millions of records costs nothing
to read back. A window cut short by the drain makes the backlog grow (sized from the rate and the events
used before the window) and the system run again; a window that is still short is reported as such.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.dataset import Dataset, produce_payloads
from bench.loadgen import relabel
from bench.measure import usage_in_window
from bench.phases import MB, Settings, start_job
from bench.procs import GroupWatcher, Job, Sampler, TopicCounter
from bench.scenarios import Scenario

log = logging.getLogger(__name__)

TAIL_SHARE = 0.05
"""Share of what is left of the backlog when the window opens that is kept out of it (uneven partition drain)."""
GROWTH = 1.3
"""Margin on the backlog a short window showed to be needed (rates and join times vary from run to run)."""
MAX_RERUNS = 2
"""Runs of one scenario discarded because the backlog drained before the window was long enough."""
POLL_S = 0.1


class Backlog:
    """The events topic every throughput run reads; grown by whole passes over the pre-encoded events, each
    pass with its own 4-hex-digit event-id prefix ("0001", "0002", ...) so event ids stay unique."""

    def __init__(self, dataset: Dataset, max_events: int) -> None:
        self.dataset = dataset
        self.max_events = max_events
        self.size = len(dataset.payloads)
        self._passes = 1

    def grow_to(self, events: int) -> bool:
        """Append events until the topic holds at least `events` (at most `max_events`); False if it cannot grow."""
        target = min(events, self.max_events)
        if target < events:
            log.warning("backlog capped at %d events (--max-backlog-events); %d wanted", self.max_events, events)
        if target <= self.size:
            return False
        payloads = self.dataset.payloads
        started, before = time.monotonic(), self.size
        while self.size < target and self._passes < 0xFFFF:
            tag = b"%04x" % self._passes
            chunk = payloads[: min(len(payloads), target - self.size)]
            produce_payloads(
                self.dataset.stack.bootstrap, self.dataset.events_topic, [(k, relabel(v, tag)) for k, v in chunk]
            )
            self.size += len(chunk)
            self._passes += 1
        log.info("backlog grown from %d to %d events in %.1fs", before, self.size, time.monotonic() - started)
        return True


def _count(counter: TopicCounter) -> tuple[float, int]:
    """(wall-clock ms, records on the topic), the time taken half-way through the watermark queries."""
    before = time.time()
    count = counter.count()
    return (before + time.time()) * 500, count


def _window(
    scenario: Scenario, settings: Settings, job: Job, group: GroupWatcher, counter: TopicCounter, total: int
) -> tuple[tuple[float, int], tuple[float, int], float | None, bool]:
    """(start, end) of the measured window as (wall ms, output count), when the first output appeared, and
    whether the window ended because the backlog was (nearly) drained."""
    deadline = time.monotonic() + settings.ready_timeout_s
    first_output_ms: float | None = None
    while True:
        job.check_alive()
        wall_ms, count = _count(counter)
        if count and first_output_ms is None:
            first_output_ms = wall_ms
        if count >= (1 - TAIL_SHARE) * total:  # drained before the group was settled: no window at all
            return (wall_ms, count), (wall_ms, count), first_output_ms, True
        settled_ms = (
            None if group.stable_ms is None or first_output_ms is None else max(group.stable_ms, first_output_ms)
        )
        if settled_ms is not None and wall_ms >= settled_ms + settings.settle_seconds * 1000:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{scenario.name}: no stable group of {scenario.processes} with output within "
                f"{settings.ready_timeout_s:.0f}s\n{job.log_tail()}"
            )
        time.sleep(POLL_S)
    start = (wall_ms, count)
    end_mark = count + (1 - TAIL_SHARE) * (total - count)
    close_ms = wall_ms + settings.measure_seconds * 1000
    while True:
        time.sleep(POLL_S)
        job.check_alive()
        wall_ms, count = _count(counter)
        if count >= end_mark:
            return start, (wall_ms, count), first_output_ms, True
        if wall_ms >= close_ms:
            return start, (wall_ms, count), first_output_ms, False


def _drop_topic(dataset: Dataset, topic: str) -> None:
    """Delete a throughput output topic right away: it may hold millions of records nobody reads."""
    admin = AdminClient({"bootstrap.servers": dataset.stack.bootstrap})
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - the run's clean-up deletes it again at the end
            log.warning("could not delete %s: %s", topic, exc)


def measure_once(
    scenario: Scenario, dataset: Dataset, settings: Settings, backlog: Backlog, tag: str
) -> dict[str, Any]:
    """One run of a system over the backlog: events/s in its window, CPU per 1k events, peak RSS."""
    output_topic = dataset.topic(f"{scenario.name}-{tag}")
    total = backlog.size
    job = start_job(scenario, dataset, settings, dataset.events_topic, output_topic, tag)
    group = GroupWatcher(dataset.stack.bootstrap, f"{output_topic}-group", scenario.processes).start()
    sampler = Sampler(job.pids, list(dataset.stack.server_pids.values())).start()
    counter = TopicCounter(dataset.stack.bootstrap, output_topic, dataset.partitions)
    started = time.monotonic()
    try:
        (start_ms, start_count), (end_ms, end_count), first_output_ms, drained = _window(
            scenario, settings, job, group, counter, total
        )
    finally:
        job.stop()
        samples = sampler.stop()
        stable_ms = group.stop()
        counter.close()
        if not settings.keep_topics:
            _drop_topic(dataset, output_topic)
    window_s = (end_ms - start_ms) / 1000
    events = end_count - start_count
    if window_s > 0:
        rate = events / window_s
    else:  # no window: the rate since the first output, only good enough to size a bigger backlog
        rate = end_count / max((end_ms - (first_output_ms or start_ms)) / 1000, 1e-3)
    cpu_s, server_cpu_s, peak_rss = usage_in_window(samples, start_ms, end_ms)
    result = {
        "events_per_s": round(float(rate), 1),
        "window_s": round(window_s, 2),
        "short_window": window_s < settings.min_window_seconds,
        "cpu_s_per_1k": round(cpu_s / events * 1000, 4) if events else None,
        "server_cpu_s_per_1k": round(server_cpu_s / events * 1000, 4) if events else None,
        "peak_rss_mb": round(peak_rss / MB, 1),
        "window_events": events,
        "before_window": start_count,
        "backlog": total,
        "drained": drained,
        "wall_s": round(time.monotonic() - started, 1),
        "group_stable_after_s": round((stable_ms - samples[0].wall_ms) / 1000, 2) if stable_ms else None,
    }
    log.info("%-22s throughput %s", scenario.name, result)
    return result


def _needed(result: dict[str, Any], settings: Settings) -> int:
    """Backlog for a full window next time: what was used before the window, the window at the measured rate,
    the undrained tail, and a margin."""
    used_before = result["before_window"]
    if result["window_s"] <= 0:  # all of it went before the group settled: it takes at least twice as much
        used_before = 2 * result["backlog"]
    window_events = result["events_per_s"] * (settings.measure_seconds + settings.settle_seconds)
    return int((used_before + window_events / (1 - TAIL_SHARE)) * GROWTH)


def throughput(
    scenario: Scenario, dataset: Dataset, settings: Settings, backlog: Backlog, repeats: int = 1
) -> dict[str, Any]:
    """The median (lower middle for an even count) of `repeats` runs, each with a window of at least
    `min_window_seconds` when the backlog can be made long enough; the runs and discarded runs beside it."""
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    while len(runs) < repeats:
        result = measure_once(scenario, dataset, settings, backlog, f"tput{len(runs) + len(discarded)}")
        if (
            result["short_window"]
            and result["drained"]
            and len(discarded) < MAX_RERUNS
            and backlog.grow_to(_needed(result, settings))
        ):
            log.info(
                "%s: window %.2fs < %.0fs, run again on %d events",
                scenario.name,
                result["window_s"],
                settings.min_window_seconds,
                backlog.size,
            )
            discarded.append({k: result[k] for k in ("events_per_s", "window_s", "backlog")})
            continue
        runs.append(result)
    ranked = sorted(runs, key=lambda r: r["events_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["short_window"] = any(r["short_window"] for r in runs)
    if repeats > 1:
        chosen["repeats"] = [{k: r[k] for k in ("events_per_s", "window_s", "short_window")} for r in runs]
    if discarded:
        chosen["discarded"] = discarded
    return chosen
