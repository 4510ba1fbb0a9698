"""The live maximum: the highest offered rate one system sustains while the load generator runs beside it.

The maximum over the backlog (bench.throughput) is measured with no load generator: the worker has the
machine's cores to itself and the broker only serves fetches. Live, the load generator and the broker's
produce path take the same cores, so a rate that is "80% of the maximum" may be more than the worker can
sustain. This search keeps one worker running on one input topic and offers it rates chosen by bisection
between `low` and `high` shares of the backlog maximum. A rate is sustained when the backlog (input records
minus output records, from the watermarks) stays bounded over a `window_s` window after the warm-up: its
least-squares growth over the window is under `GROWTH_SHARE` of the offered rate. Between steps the worker
drains what is left. The search stops when the bracket is narrower than `resolution` of the backlog maximum
or when the next step would pass `budget_s`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from bench.dataset import Dataset
from bench.phases import Settings, _probe, start_job, start_loadgen
from bench.procs import GroupWatcher, Job, TopicCounter, wait_for_count
from bench.scenarios import Scenario

log = logging.getLogger(__name__)

GROWTH_SHARE = 0.02
"""A backlog growing by less than 2% of the offered rate (per second, over the window) counts as bounded."""
SAMPLE_S = 0.5


def _step(
    job: Job,
    dataset: Dataset,
    settings: Settings,
    topic: str,
    rate: float,
    window_s: float,
    counters: tuple[TopicCounter, TopicCounter],
) -> dict[str, Any]:
    """Offer `rate` for the warm-up plus `window_s`; the backlog's growth over the window."""
    inputs, outputs = counters
    loadgen = start_loadgen(dataset, topic, rate, settings.warmup_seconds + window_s)
    started = time.monotonic()
    times, backlog = [], []
    while loadgen.poll() is None:
        job.check_alive()
        elapsed = time.monotonic() - started
        if elapsed >= settings.warmup_seconds:
            times.append(elapsed)
            backlog.append(inputs.count() - outputs.count())
        if elapsed > settings.warmup_seconds + window_s + 60:
            loadgen.kill()
            raise RuntimeError(f"{job.name}: the load generator did not finish in time")
        time.sleep(SAMPLE_S)
    stdout = loadgen.stdout.read() if loadgen.stdout else ""
    if loadgen.returncode != 0:
        raise RuntimeError(f"load generator failed ({loadgen.returncode}): {stdout}")
    achieved = float(json.loads(stdout.strip().splitlines()[-1])["rate"])
    growth = float(np.polyfit(times, backlog, 1)[0]) if len(times) >= 3 else float("inf")
    sustained = growth < GROWTH_SHARE * achieved and achieved >= 0.97 * rate
    return {
        "offered_per_s": round(rate, 1),
        "achieved_offered_per_s": round(achieved, 1),
        "backlog_growth_per_s": round(growth, 1),
        "backlog_at_end": int(backlog[-1]) if backlog else None,
        "sustained": bool(sustained),
    }


def live_maximum(
    scenario: Scenario,
    dataset: Dataset,
    settings: Settings,
    backlog_max: float,
    window_s: float = 10.0,
    budget_s: float = 150.0,
    low: float = 0.4,
    high: float = 1.05,
    resolution: float = 0.03,
) -> dict[str, Any]:
    """Bisection for the highest sustained offered rate; the steps beside it."""
    input_topic, output_topic = dataset.topic(f"{scenario.name}-live-in"), dataset.topic(f"{scenario.name}-live-out")
    dataset.create_topics(input_topic)
    job = start_job(scenario, dataset, settings, input_topic, output_topic, "live")
    inputs = TopicCounter(dataset.stack.bootstrap, input_topic, dataset.partitions)
    outputs = TopicCounter(dataset.stack.bootstrap, output_topic, dataset.partitions)
    started = time.monotonic()
    steps: list[dict[str, Any]] = []
    lo, hi = low * backlog_max, high * backlog_max
    best: float | None = None
    try:
        group = GroupWatcher(dataset.stack.bootstrap, f"{output_topic}-group", scenario.processes).start()
        deadline = time.monotonic() + settings.ready_timeout_s
        while group.stable_ms is None and time.monotonic() < deadline:
            job.check_alive()
            time.sleep(0.1)
        if group.stop() is None:
            raise RuntimeError(f"{scenario.name}: the consumer group did not settle\n{job.log_tail()}")
        probes = _probe(dataset, input_topic)
        if not wait_for_count(outputs, probes, settings.ready_timeout_s, job)[1]:
            raise RuntimeError(f"{scenario.name}: no output for the probe events\n{job.log_tail()}")
        step_s = settings.warmup_seconds + window_s + 3.0  # and the drain after it
        while hi - lo > resolution * backlog_max and time.monotonic() - started + step_s <= budget_s:
            rate = (lo + hi) / 2
            step = _step(job, dataset, settings, input_topic, rate, window_s, (inputs, outputs))
            step["at_s"] = round(time.monotonic() - started, 1)
            steps.append(step)
            log.info("live maximum of %s: %s", scenario.name, step)
            if step["sustained"]:
                lo, best = rate, max(best or 0.0, step["achieved_offered_per_s"])
            else:
                hi = rate
            # Drain what the step left before the next one (a step that fell behind leaves a queue).
            drain_until = time.monotonic() + 20
            while inputs.count() - outputs.count() > 0 and time.monotonic() < drain_until:
                job.check_alive()
                time.sleep(0.2)
    finally:
        job.stop()
        inputs.close()
        outputs.close()
    return {
        # The highest sustained rate; when no step was sustained, the bracket's low end (not verified).
        "events_per_s": round(best if best is not None else lo, 1),
        "verified": best is not None,
        "backlog_max_per_s": round(backlog_max, 1),
        "bracket": [round(lo, 1), round(hi, 1)],
        "window_s": window_s,
        "growth_share": GROWTH_SHARE,
        "seconds": round(time.monotonic() - started, 1),
        "steps": steps,
    }
