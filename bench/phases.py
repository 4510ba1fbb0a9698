"""The latency measurements: latency at an offered rate and the hot-swap window (throughput: bench.throughput)."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Producer

from bench.dataset import SCHEMAS, Dataset
from bench.loadgen import relabel
from bench.measure import (
    Latency,
    TopicRecords,
    contention_in_window,
    match_latencies,
    read_topic,
    usage_in_window,
)
from bench.procs import GroupWatcher, Job, Sampler, TopicCounter, wait_for_count
from bench.scenarios import Scenario, commands, job_env, streamserve_topics
from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.publish import publish, send
from streamserve.control.rollout import AcceptancePolicy
from streamserve.pipeline.decode import load_schema

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class Settings:
    """Knobs of one benchmark run."""

    out_dir: Path
    min_window_seconds: float = 10.0
    """Shortest measured window a throughput figure may rest on; a shorter one is reported as such."""
    settle_seconds: float = 1.0
    """Left out of a throughput window after the group is stable and output flows (cooperative second round)."""
    keep_topics: bool = False
    """Keep each throughput run's output topic (otherwise deleted as soon as it is counted)."""
    rate_seconds: float = 10.0
    """Measured seconds of an offered-rate run (after the warm-up)."""
    warmup_seconds: float = 2.0
    drain_seconds: float = 20.0
    ready_timeout_s: float = 120.0

    @property
    def measure_seconds(self) -> float:
        """How long a throughput window is held open: a second over the minimum, so polling never cuts it short."""
        return self.min_window_seconds + 1.0


def create_output_topics(dataset: Dataset, scenario: Scenario, output_topic: str) -> None:
    """The topics a scenario writes (streamserve also needs its DLQ, shadow, control and status topics)."""
    if scenario.kind == "streamserve":
        wide, narrow = streamserve_topics(output_topic)
        dataset.create_topics(*wide)
        dataset.create_topics(*narrow, partitions=1)
    else:
        dataset.create_topics(output_topic)


def start_job(
    scenario: Scenario, dataset: Dataset, settings: Settings, input_topic: str, output_topic: str, tag: str
) -> Job:
    create_output_topics(dataset, scenario, output_topic)
    work = settings.out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    return Job(
        name=f"{scenario.name}-{tag}",
        commands=commands(scenario, dataset, input_topic, output_topic, work),
        log_dir=settings.out_dir / "logs",
        env=job_env(scenario),
    ).start()


def start_loadgen(dataset: Dataset, topic: str, rate: float, seconds: float) -> subprocess.Popen[str]:
    """The load generator (bench/loadgen.py) offering `rate` events/s of the dataset to `topic` for `seconds`;
    it prints one JSON line on stdout when done."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "bench.loadgen", "--bootstrap", dataset.stack.bootstrap, "--topic", topic),
            *("--payloads", str(dataset.payload_file), "--rate", str(rate), "--seconds", str(seconds)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def _probe(dataset: Dataset, topic: str) -> int:
    """One event per partition, so a reader of every partition proves it serves; returns how many."""
    producer = Producer({"bootstrap.servers": dataset.stack.bootstrap})
    for partition in range(dataset.partitions):
        key, value = dataset.payloads[partition]
        producer.produce(topic, relabel(value, b"p%02d-" % partition), key, partition=partition)
    producer.flush(30)
    return dataset.partitions


def offered_rate(
    scenario: Scenario,
    dataset: Dataset,
    settings: Settings,
    rate: float,
    tag: str,
    seconds: float | None = None,
    during: Callable[[float], None] | None = None,
    keep_values: bool = False,
    windows: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Latency percentiles while a load generator offers `rate` events/s to a fresh input topic.

    Returns the summary and the raw material (input/output records, window) for further analysis.
    `during(elapsed_s)` is called about every 0.1 s while the load runs (the hot-swap run publishes from it).
    With `windows` > 1 the load runs that many windows of `seconds` back to back (one worker, one warm-up);
    the percentiles are the median over the windows, each window's figures and the p99 spread beside them.
    """
    seconds = (seconds or settings.rate_seconds) * windows
    input_topic = dataset.topic(f"{scenario.name}-{tag}-in")
    output_topic = dataset.topic(f"{scenario.name}-{tag}-out")
    dataset.create_topics(input_topic)
    job = start_job(scenario, dataset, settings, input_topic, output_topic, tag)
    counter = TopicCounter(dataset.stack.bootstrap, output_topic, dataset.partitions)
    try:
        # Every process in the group first, so that no rebalance falls into the measured window.
        group = GroupWatcher(dataset.stack.bootstrap, f"{output_topic}-group", scenario.processes).start()
        deadline = time.monotonic() + settings.ready_timeout_s
        while group.stable_ms is None and time.monotonic() < deadline:
            job.check_alive()
            time.sleep(0.1)
        if group.stop() is None:
            raise RuntimeError(f"{scenario.name}: the consumer group did not settle\n{job.log_tail()}")
        if scenario.processes > 1:
            time.sleep(1.0)  # cooperative rebalancing assigns in a second round after the group is stable
        probes = _probe(dataset, input_topic)
        _, ready = wait_for_count(counter, probes, settings.ready_timeout_s, job)
        if not ready:
            raise RuntimeError(f"{scenario.name}: no output for the probe events\n{job.log_tail()}")
        sampler = Sampler(job.pids, list(dataset.stack.server_pids.values())).start()
        loadgen = start_loadgen(dataset, input_topic, rate, settings.warmup_seconds + seconds)
        load_started = time.monotonic()
        deadline = load_started + settings.warmup_seconds + seconds + 60
        while loadgen.poll() is None:
            if during is not None:
                during(time.monotonic() - load_started)
            time.sleep(0.1)
            job.check_alive()
            if time.monotonic() > deadline:
                loadgen.kill()
                raise RuntimeError(f"{scenario.name}: the load generator did not finish in time")
        stdout = loadgen.stdout.read() if loadgen.stdout else ""
        if loadgen.returncode != 0:
            raise RuntimeError(f"load generator failed ({loadgen.returncode}): {stdout}")
        generated = json.loads(stdout.strip().splitlines()[-1])
        _, drained = wait_for_count(counter, probes + generated["sent"], settings.drain_seconds, job)
    finally:
        job.stop()
        counter.close()
    samples = sampler.stop()
    batch_wait_ms = _longest_batch_wait_ms(job)
    inputs = read_topic(dataset.stack.bootstrap, input_topic, dataset.partitions)
    outputs = read_topic(
        dataset.stack.bootstrap, output_topic, dataset.partitions, keep_values=keep_values, predictions=True
    )
    generated_ts = np.sort(inputs.timestamps_ms[[not i.startswith(b"p") for i in inputs.ids]])
    start_ms = float(generated_ts[0]) + settings.warmup_seconds * 1000
    end_ms = float(generated_ts[-1]) + 1
    sent_ms, latency_ms, offered = match_latencies(inputs, outputs, start_ms, end_ms)
    lat = Latency.of(latency_ms, offered)
    cpu_s, server_cpu_s, peak_rss = usage_in_window(samples, start_ms, end_ms)
    waiting_cores, busy_cores = contention_in_window(samples, start_ms, end_ms)
    summary = {
        "offered_per_s": round(float(rate), 1),
        "achieved_offered_per_s": generated["rate"],
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(lat).items()},
        "kept_up": drained and lat.matched == offered,
        "cpu_s_per_1k": round(cpu_s / max(lat.matched, 1) * 1000, 4),
        "peak_rss_mb": round(peak_rss / MB, 1),
        "max_batch_wait_ms": batch_wait_ms,
        "cpu_wait_cores": round(waiting_cores, 2),
        "machine_busy_cores": round(busy_cores, 2),
        "server_cores": (  # None when the servers are not processes of this machine (a remote stack)
            round(server_cpu_s / max((end_ms - start_ms) / 1000, 1e-9), 2) if dataset.stack.server_pids else None
        ),
        "per_second": _per_second(sent_ms, latency_ms, start_ms - settings.warmup_seconds * 1000),
    }
    if windows > 1:
        summary |= _windows(inputs, sent_ms, latency_ms, start_ms, end_ms, windows)
    log.info("%-22s @%8.0f/s %s", scenario.name, rate, {k: v for k, v in summary.items() if k != "per_second"})
    raw = {
        "inputs": inputs,
        "outputs": outputs,
        "sent_ms": sent_ms,
        "latency_ms": latency_ms,
        "start_ms": start_ms,
        "end_ms": end_ms,
    }
    return summary, raw


def _windows(
    inputs: TopicRecords, sent_ms: np.ndarray, latency_ms: np.ndarray, start_ms: float, end_ms: float, count: int
) -> dict[str, Any]:
    """Percentiles of each of `count` equal windows of input append time; their medians; the p99 spread."""
    edges = np.linspace(start_ms, end_ms, count + 1)
    found = []
    for low, high in itertools.pairwise(edges):
        chosen = (sent_ms >= low) & (sent_ms < high)
        offered = int(((inputs.timestamps_ms >= low) & (inputs.timestamps_ms < high)).sum())
        found.append(
            {
                k: round(v, 2) if isinstance(v, float) else v
                for k, v in asdict(Latency.of(latency_ms[chosen], offered)).items()
            }
        )
    medians = {k: round(float(np.median([w[k] for w in found])), 2) for k in ("p50", "p95", "p99", "max")}
    p99s = [w["p99"] for w in found]
    return {
        **medians,
        "windows": found,
        "p99_spread": [min(p99s), max(p99s)],
        "window_s": round((edges[1] - edges[0]) / 1000, 2),
    }


def _per_second(sent_ms: np.ndarray, latency_ms: np.ndarray, origin_ms: float) -> list[dict[str, float]]:
    """Per second of input append time (from the first generated input): events matched, p50 and p99 latency.

    Where a run's latency comes from: a queue built at the start and drained slowly, or one that grows."""
    if len(sent_ms) == 0:
        return []
    second = ((sent_ms - origin_ms) // 1000).astype(np.int64)
    rows = []
    for s in np.unique(second):
        chosen = latency_ms[second == s]
        p50, p99 = np.percentile(chosen, [50, 99])
        rows.append({"second": int(s), "events": len(chosen), "p50": float(p50), "p99": float(p99)})
    return rows


def hot_swap(
    scenario: Scenario,
    dataset: Dataset,
    settings: Settings,
    rate: float,
    seconds: float = 16.0,
    publish_at_s: float = 8.0,
    versions: tuple[str, str] = ("v1", "v2"),
    tag: str = "swap",
) -> dict[str, Any]:
    """p99 latency in the 2 s around a switch from versions[0] (the worker starts on it) to versions[1],
    against steady state, at an offered rate."""
    start, target = versions
    scenario = replace(
        scenario, overrides={**scenario.overrides, "model.uri": str(dataset.models[start]), "model.version": start}
    )
    output_topic = dataset.topic(f"{scenario.name}-{tag}-out")
    config, control_topic = {"bootstrap.servers": dataset.stack.bootstrap}, f"{output_topic}.control"
    published: dict[str, float] = {}
    prepared: list[ModelAnnouncement] = []

    def announce(elapsed_s: float) -> None:
        # The publisher's own work (reading the control topic to the end for the next generation, the digest)
        # is done at the first call, in the warm-up (publish(write=False)): on these shared cores it would
        # otherwise land in the window as CPU taken from the worker, before the worker even sees the
        # announcement. At 8 s the announcement is only written, as `streamserve publish` would write it.
        if not prepared:
            policy, uri = AcceptancePolicy("fraud"), str(dataset.models[target])
            prepared.append(publish(config, control_topic, policy, target, uri, notes="bench hot swap", write=False))
            return
        if "wall_ms" in published or elapsed_s < settings.warmup_seconds + publish_at_s:
            return
        published["wall_ms"] = time.time() * 1000
        threading.Thread(target=send, args=(config, control_topic, prepared[0]), daemon=True).start()

    summary, raw = offered_rate(scenario, dataset, settings, rate, tag, seconds, during=announce, keep_values=True)
    schema = load_schema(SCHEMAS / "prediction.avsc")
    outputs = raw["outputs"]
    switched = np.array(
        [fastavro.schemaless_reader(io.BytesIO(v), schema, None)["model_version"] == target for v in outputs.values],
        dtype=bool,
    )
    if not switched.any() or "wall_ms" not in published:
        raise RuntimeError(f"the hot swap did not happen: no {target} prediction")
    switch_ms = float(outputs.timestamps_ms[switched].min())
    publish_ms = published["wall_ms"]
    # Latency by output time: re-match so each latency has its output timestamp.
    appended = {i: t for i, t in zip(raw["inputs"].ids, raw["inputs"].timestamps_ms.tolist(), strict=True)}
    out_ts, lat = [], []
    seen: set[bytes] = set()
    for event_id, ts in zip(outputs.ids, outputs.timestamps_ms.tolist(), strict=True):
        if event_id in appended and event_id not in seen and appended[event_id] >= raw["start_ms"]:
            seen.add(event_id)
            out_ts.append(ts)
            lat.append(ts - appended[event_id])
    out_arr, lat_arr = np.array(out_ts, dtype=np.float64), np.array(lat, dtype=np.float64)

    def p99(mask: np.ndarray) -> float:
        return float(np.percentile(lat_arr[mask], 99)) if mask.any() else float("nan")

    steady = out_arr < publish_ms - 500
    around = (out_arr >= switch_ms - 1000) & (out_arr <= switch_ms + 1000)
    loading = (out_arr >= publish_ms) & (out_arr <= switch_ms + 1000)
    after = out_arr > switch_ms + 1000
    result = {
        "swap": f"{start} -> {target}",
        "offered_per_s": summary["offered_per_s"],
        "publish_to_switch_s": round((switch_ms - publish_ms) / 1000, 2),
        "steady_p99_ms": round(p99(steady), 2),
        "switch_window_p99_ms": round(p99(around), 2),
        "announce_to_switch_p99_ms": round(p99(loading), 2),
        "after_switch_p99_ms": round(p99(after), 2),
        "switch_window_events": int(around.sum()),
        "ratio": round(p99(around) / p99(steady), 2),
        "kept_up": summary["kept_up"],
        "timeline": _timeline(out_arr, lat_arr, publish_ms, switch_ms),
    }
    log.info("hot swap %s", {k: v for k, v in result.items() if k != "timeline"})
    return result


def _timeline(out_ms: np.ndarray, lat_ms: np.ndarray, publish_ms: float, switch_ms: float) -> dict[str, Any]:
    """p99 per 250 ms of output time, relative to the switch, for the hot-swap chart."""
    if not len(out_ms):
        return {}
    edges = np.arange(out_ms.min(), out_ms.max() + 250, 250)
    index = np.digitize(out_ms, edges)
    points = []
    for bucket in np.unique(index):
        chosen = lat_ms[index == bucket]
        if len(chosen) >= 10:
            points.append(
                [round((edges[bucket - 1] - switch_ms) / 1000, 3), round(float(np.percentile(chosen, 99)), 2)]
            )
    return {"p99_per_250ms": points, "publish_s": round((publish_ms - switch_ms) / 1000, 3)}


_BATCH_WAIT = re.compile(r"max_batch_wait_ms=([0-9.]+)")


def _longest_batch_wait_ms(job: Job) -> float | None:
    """The longest a batch's first record waited in a streamserve worker before scoring, as the workers logged
    it on their way out (``max_batch_wait_ms=`` of the final progress line); None for other systems."""
    found: list[float] = []
    for i in range(len(job.commands)):
        path = job.log_dir / f"{job.name}-{i}.log"
        if path.exists():
            found += [float(m) for m in _BATCH_WAIT.findall(path.read_text(errors="replace"))]
    return max(found) if found else None
