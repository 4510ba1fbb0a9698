"""`python -m bench`: every scenario on the same events and model, in one run; results, charts, BENCHMARKS.md.

`make bench` brings up the stack, installs the `bench` extra and runs this with its defaults;
`.venv/bin/python -m bench --events 20000 --min-window-seconds 3 --rate-seconds 3 --window-seconds 2
--live-window-seconds 4 --live-budget-seconds 40` is a quick run while developing (its throughput figures are
flagged: their windows are under the default 10 s).

Throughput is sized by time, not by a fixed backlog: each system is measured over a window of at least
--min-window-seconds, from when its consumer group is stable with every member and output flows. The
backlog (--events distinct events, repeated with fresh ids) grows when a system drains it too soon, up to
--max-backlog-events; a window that is still short is flagged in the tables and in every target that uses
it. The Kafka limit is the median of --kafka-repeats runs of each passthrough scenario.

Latency: every system at a fixed offered rate; streamserve (1 process) also at the shares --sweep of its live
maximum (bench.livemax: the highest rate it sustains while the load generator runs, by bisection), each point
--windows windows of --window-seconds, and --swaps hot swaps (the medians count). BENCHMARKS.md: the method.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

from bench import report
from bench.batch_score import batch_score
from bench.components import run_components
from bench.dataset import REPO, Dataset, Stack, cleanup_redis, delete_topics, find_stack, prepare
from bench.livemax import live_maximum
from bench.monitor_rate import monitor_rate, processes_needed
from bench.phases import Settings, create_output_topics, hot_swap, offered_rate
from bench.procs import Job, TopicCounter, wait_for_count
from bench.scenarios import EXAMPLE_PIPELINE, VENVS, Scenario, commands, ensure_peer_venv, job_env
from bench.throughput import Backlog, throughput

log = logging.getLogger("bench")

RESULTS = Path(__file__).resolve().parent / "results"
SWAPS = (("v1", "v2"), ("v2", "v1"), ("v1", "v2"))
"""The hot swaps, in order: each a fresh worker started on the first version, switched to the second."""
WARM_BROKER_S = 300.0
"""A broker up for less than this is warmed by one unmeasured passthrough run first: for its first minutes its JIT
is still compiling, and it spends up to twice the CPU on the same traffic (docs/benchmarks/history/, 19:28 run)."""


def scenarios(processes: int, peers: bool) -> list[Scenario]:
    """Every system under test, in table order."""
    found = [
        Scenario("kafka-limit-1", "passthrough", 1, "Kafka limit (passthrough, 1 process)"),
        Scenario(
            f"kafka-limit-{processes}", "passthrough", processes, f"Kafka limit (passthrough, {processes} processes)"
        ),
        Scenario("handloop", "handloop", 1, "hand-written per-event loop"),
        Scenario(
            "handloop-commit-each",
            "handloop",
            1,
            "hand-written loop, commit() per event",
            args=("--commit", "each"),
            latency=False,
        ),
        Scenario("batchloop", "batchloop", 1, "hand-tuned batch loop (1 process)", near_max=False),
        Scenario(
            "batchloop-packed",
            "batchloop",
            1,
            "hand-tuned batch loop, packed features (1 process)",
            layout="packed",
            near_max=False,
        ),
    ]
    if peers:
        found += [
            Scenario("quix", "quix", 1, "Quix Streams 3.28 (1 process)"),
            Scenario("faust", "faust", 1, "faust-streaming 0.15 take() (1 process)"),
        ]
    found += [
        Scenario("streamserve-1", "streamserve", 1, "streamserve, defaults (1 process)"),
        Scenario(
            "streamserve-1-featurelog",
            "streamserve",
            1,
            "streamserve, 1% feature log (1 process)",
            overrides={"monitor.feature_log": True, "monitor.feature_log_share": 0.01},
            latency=False,
        ),
        Scenario(
            f"streamserve-{processes}", "streamserve", processes, f"streamserve, defaults ({processes} processes)"
        ),
        Scenario("streamserve-packed-1", "streamserve", 1, "streamserve, packed features (1 process)", layout="packed"),
        Scenario(
            f"streamserve-packed-{processes}",
            "streamserve",
            processes,
            f"streamserve, packed features ({processes} processes)",
            layout="packed",
        ),
    ]
    return found


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for dist in ("confluent-kafka", "fastavro", "onnxruntime", "numpy", "redis", "hiredis"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    from confluent_kafka import libversion

    versions["librdkafka"] = libversion()[0]
    for peer, dist in (("quix", "quixstreams"), ("faust", "faust-streaming")):
        python = VENVS / peer / "bin" / "python"
        if python.exists():
            out = subprocess.run(
                [str(python), "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
                capture_output=True,
                text=True,
            )
            versions[dist] = out.stdout.strip() or None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }


def broker_uptime_s(stack: Stack) -> float | None:
    """Seconds since the broker process started; None when it is not a process of this machine."""
    pid = stack.server_pids.get("kafka")
    if pid is None or not psutil.pid_exists(pid):
        return None
    return time.time() - psutil.Process(pid).create_time()


def server_versions(stack: Stack) -> dict[str, str]:
    """Kafka and Redis versions as the servers report them."""
    info = redis.Redis.from_url(stack.redis_url).info("server")
    kafka = os.environ.get("STREAMSERVE_KAFKA_VERSION", "4.1.2")
    return {"kafka": kafka, "redis": str(info.get("redis_version"))}


def profile_streamserve(dataset: Dataset, settings: Settings, seconds: float, layout: str) -> Path | None:
    """py-spy samples a streamserve worker while it works through the backlog; returns the collapsed stacks."""
    py_spy = Path(sys.executable).parent / "py-spy"
    if not py_spy.exists():
        log.warning("py-spy not installed (pip install -e '.[bench]'): no profile")
        return None
    scenario = Scenario(f"profile-{layout}", "streamserve", 1, layout=layout)
    output_topic = dataset.topic(f"profile-{layout}")
    create_output_topics(dataset, scenario, output_topic)
    work = settings.out_dir / "work"
    job = Job(
        f"profile-{layout}",
        commands(scenario, dataset, dataset.events_topic, output_topic, work),
        settings.out_dir / "logs",
        job_env(scenario),
    ).start()
    raw = settings.out_dir / f"profile-streamserve-{layout}.txt"
    spy = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(job.pids[0]),
            "--format",
            "raw",
            "--rate",
            "250",
            "--output",
            str(raw),
            "--duration",
            str(int(seconds)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    counter = TopicCounter(dataset.stack.bootstrap, output_topic, dataset.partitions)
    try:
        wait_for_count(counter, len(dataset.payloads), seconds, job)
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
        job.stop()
        counter.close()
    return raw if raw.exists() else None


def median_swap(swaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The swap with the median ratio (the lower middle for an even count), every swap's figures beside it."""
    ranked = sorted(swaps, key=lambda r: r["ratio"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["swaps"] = [{k: v for k, v in r.items() if k != "timeline"} for r in swaps]
    chosen["ratios"] = [r["ratio"] for r in swaps]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--events",
        type=int,
        default=200_000,
        help="distinct events: the first backlog and the load generator's set (200000)",
    )
    parser.add_argument(
        "--min-window-seconds",
        type=float,
        default=10.0,
        help="shortest throughput window; the backlog grows until each window reaches it, shorter ones are "
        "flagged (10)",
    )
    parser.add_argument(
        "--max-backlog-events",
        type=int,
        default=20_000_000,
        help="the backlog grows to at most this many events (20000000, ~1.6 GB on the broker)",
    )
    parser.add_argument(
        "--kafka-repeats", type=int, default=3, help="runs of each Kafka passthrough scenario; the median counts (3)"
    )
    parser.add_argument("--partitions", type=int, default=8, help="partitions of every topic (8)")
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 2, help="processes of the N-process scenarios (cores)"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="seconds py-spy samples a streamserve worker for the profile (30)",
    )
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="measured seconds per offered rate (10)")
    parser.add_argument(
        "--fixed-share", type=float, default=0.2, help="fixed offered rate, as a share of streamserve-1's maximum (0.2)"
    )
    parser.add_argument(
        "--near-max-share",
        type=float,
        default=0.9,
        help="'at max throughput' rate, as a share of each system's own maximum (0.9)",
    )
    parser.add_argument(
        "--sweep",
        default="0.1,0.4,0.6,0.8,0.9",
        help="offered rates of the latency sweep of streamserve-1, as shares of its live maximum (0.1,...,0.9)",
    )
    parser.add_argument(
        "--windows", type=int, default=3, help="measured windows per sweep point; the median counts (3)"
    )
    parser.add_argument("--window-seconds", type=float, default=6.0, help="seconds of each sweep window (6)")
    parser.add_argument(
        "--live-window-seconds",
        type=float,
        default=10.0,
        help="window over which the backlog must stay bounded at a step of the live-maximum search (10)",
    )
    parser.add_argument(
        "--live-budget-seconds", type=float, default=150.0, help="time bound of the live-maximum search (150)"
    )
    parser.add_argument(
        "--swaps", type=int, default=3, help="hot swaps (v1->v2, v2->v1, v1->v2); the median counts (3)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip Quix Streams and faust")
    parser.add_argument("--only", help="comma-separated scenario names, `monitor` for the monitor phase (default: all)")
    parser.add_argument("--monitor-events", type=int, default=100_000, help="events of the monitor phase (100000)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of streamserve")
    parser.add_argument("--no-latency", action="store_true", help="throughput only")
    parser.add_argument("--out", type=Path, help="results directory (bench/results/<timestamp>)")
    parser.add_argument("--no-benchmarks-md", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument(
        "--keep-topics",
        action="store_true",
        help="leave the run's topics on the broker (throughput outputs too, which can be large)",
    )
    parser.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="only redraw a run's report from its json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report:
        report.write(json.loads(args.report.read_text()), args.report.parent, REPO / "BENCHMARKS.md")
        return 0

    started = time.monotonic()
    out_dir = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        out_dir,
        min_window_seconds=args.min_window_seconds,
        rate_seconds=args.rate_seconds,
        keep_topics=args.keep_topics,
    )
    stack = find_stack()
    peers = not args.no_peers
    if peers:
        for name in ("quix", "faust"):
            ensure_peer_venv(name)
    chosen = scenarios(args.processes, peers)
    if args.only:
        wanted = set(args.only.split(","))
        chosen = [s for s in chosen if s.name in wanted]

    log.info("preparing %d events, %d partitions, results in %s", args.events, args.partitions, out_dir)
    dataset = prepare(stack, out_dir, args.events, args.partitions)
    results: dict[str, Any] = {
        "command": " ".join(
            shlex.quote(a) for a in [Path(sys.executable).name, "-m", "bench", *(argv or sys.argv[1:])]
        ),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load": {"before": " ".join(Path("/proc/loadavg").read_text().split()[:3])},
        "machine": machine(),
        "servers": server_versions(stack),
        "settings": {
            "events": args.events,
            "partitions": args.partitions,
            "processes": args.processes,
            "min_window_seconds": args.min_window_seconds,
            "settle_seconds": settings.settle_seconds,
            "max_backlog_events": args.max_backlog_events,
            "kafka_repeats": args.kafka_repeats,
            "profile_seconds": args.max_seconds,
            "rate_seconds": args.rate_seconds,
            "warmup_seconds": settings.warmup_seconds,
            "fixed_share": args.fixed_share,
            "near_max_share": args.near_max_share,
            "windows": args.windows,
            "window_seconds": args.window_seconds,
            "live_window_seconds": args.live_window_seconds,
            "live_budget_seconds": args.live_budget_seconds,
            "model": "demo v1 (logistic regression, zipmap disabled)",
            "batch": yaml.safe_load(EXAMPLE_PIPELINE.read_text())["batch"],  # what the workers run
        },
        "scenarios": [],
    }
    try:
        results["components"] = run_components(dataset)
        results["batch_score"] = batch_score(dataset, out_dir)  # issue 25: rows/s on one core, beside the worker's
        rows = {
            s.name: {"name": s.name, "title": s.title, "kind": s.kind, "processes": s.processes, "layout": s.layout}
            for s in chosen
        }
        backlog = Backlog(dataset, args.max_backlog_events)
        uptime = broker_uptime_s(stack)
        results["broker_uptime_s"] = None if uptime is None else round(uptime)
        if uptime is not None and uptime < WARM_BROKER_S:
            log.info("the broker started %.0f s ago: one unmeasured passthrough run warms it first", uptime)
            throughput(Scenario("broker-warmup", "passthrough", 1, "broker warm-up"), dataset, settings, backlog)
            results["broker_warmed"] = True
        for scenario in chosen:
            repeats = args.kafka_repeats if scenario.kind == "passthrough" else 1
            rows[scenario.name]["throughput"] = throughput(scenario, dataset, settings, backlog, repeats)
        results["settings"]["backlog_events"] = backlog.size
        if not args.only or "monitor" in args.only.split(","):  # issue 24: records/s of `streamserve monitor`
            monitor = monitor_rate(stack, out_dir / "monitor", dataset.run_id, args.monitor_events)
            worker = rows.get("streamserve-1", {}).get("throughput", {}).get("events_per_s")
            results["monitor"] = {**monitor, "worker_events_per_s": worker}
            results["monitor"]["processes_needed"] = processes_needed(monitor, worker)
        # The fixed offered rate, the sweep and the hot swap follow streamserve with 1 process (defaults).
        reference = next((s for s in chosen if s.name == "streamserve-1"), None) or next(
            (s for s in chosen if s.kind == "streamserve" and s.processes == 1), None
        )
        ref_max = rows[reference.name]["throughput"]["events_per_s"] if reference else None
        if not args.no_latency and reference and ref_max:
            fixed = args.fixed_share * ref_max
            results["fixed_rate_per_s"] = round(fixed, 1)
            results["reference"] = reference.name
            for scenario in (s for s in chosen if s.latency):
                row = rows[scenario.name]
                row["fixed_rate"], _ = offered_rate(scenario, dataset, settings, fixed, "fixed")
                if scenario.near_max:
                    own = row["throughput"]["events_per_s"]
                    rate = args.near_max_share * own
                    row["near_max"], _ = offered_rate(scenario, dataset, settings, rate, "nearmax")
            # The sweep follows the live maximum: what one worker sustains while the load generator runs.
            live = live_maximum(
                reference,
                dataset,
                settings,
                ref_max,
                window_s=args.live_window_seconds,
                budget_s=args.live_budget_seconds,
            )
            results["live_max"] = live
            sweep = []
            for i, share in enumerate(float(s) for s in args.sweep.split(",") if s):
                summary, _ = offered_rate(
                    reference,
                    dataset,
                    settings,
                    share * live["events_per_s"],
                    f"sweep{i}",
                    seconds=args.window_seconds,
                    windows=args.windows,
                )
                sweep.append({"share": share, **summary})
            results["sweep"] = sorted(sweep, key=lambda r: r["share"])
            swaps = [
                hot_swap(reference, dataset, settings, fixed, 12.0, 6.0, versions=v, tag=f"swap{i}")
                for i, v in enumerate(SWAPS[: args.swaps])
            ]
            results["hot_swap"] = median_swap(swaps)
        results["scenarios"] = list(rows.values())
        worker = rows.get("streamserve-1", {}).get("throughput", {}).get("events_per_s")
        log.info(
            "batch scoring: %s rows/s on one core beside streamserve-1: %s events/s (target: batch >= worker)",
            f"{results['batch_score']['rows_per_s'] or 0:,.0f}",
            "not run" if worker is None else f"{worker:,.0f}",
        )
        if not args.no_profile:
            results["profiles"] = {}
            for layout in ("hash", "packed"):
                raw = profile_streamserve(dataset, settings, args.max_seconds, layout)
                if raw is not None:
                    results["profiles"][layout] = report.profile_summary(raw)
    finally:
        cleanup_redis(stack, dataset.run_id)
        if not args.keep_topics:
            delete_topics(stack, dataset.run_id)
        dataset.payload_file.unlink(missing_ok=True)
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["load"]["after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, out_dir, None if args.no_benchmarks_md else REPO / "BENCHMARKS.md")
    log.info("done in %.0fs: %s", results["duration_s"], out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
