"""CPU of one streamserve worker at a fixed offered rate, per thread: what a worker costs below its maximum.

    python -m bench.rate_cost --rate 300 [--seconds 14] [--max-wait-ms 10] [--layout hash]
                              [--set 'kafka.consumer={"fetch.min.bytes": 65536}' ...]

Against the local stack (`python3 scripts/stack up`): the bench's events, models and features (a fresh run id,
cleaned up after), one worker started as the bench starts it (examples/fraud/pipeline.yaml plus the bench's
overrides), and the load generator at the given rate. Over the middle of the run it reads the worker's threads'
CPU from /proc (the Python main thread, librdkafka's broker threads and its main thread) and prints them in
cores, with the CPU per event. Below the maximum a worker scores ~1000 / max_wait_ms batches a second, each with
a cost of its own, so this is what sets its CPU at low and moderate rates (README, `batch.max_wait_ms`).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.dataset import cleanup_redis, find_stack, prepare
from bench.scenarios import streamserve_config
from streamserve.admin import ensure_topics, pipeline_topics
from streamserve.config import load_settings

PARTITIONS = 8
EVENTS = 50_000
START_S = 8.0
"""Seconds the worker gets to join its group before the load starts."""
SETTLE_S = 3.0
"""Seconds of load before CPU is counted, and left out at the end."""


def thread_ticks(pid: int) -> collections.Counter[str]:
    """CPU clock ticks (user + system) per thread name of a process; librdkafka's broker threads as one."""
    ticks: collections.Counter[str] = collections.Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks["rdk:broker*" if name.startswith("rdk:broker") else name] += int(fields[11]) + int(fields[12])
    return ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, required=True, help="offered events per second")
    parser.add_argument("--seconds", type=float, default=14.0, help="seconds of load (CPU counted over all but 5)")
    parser.add_argument("--max-wait-ms", type=float, help="batch.max_wait_ms (default: the example pipeline's)")
    parser.add_argument("--layout", choices=["hash", "packed"], default="hash", help="Redis feature layout")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a pipeline setting for the worker, e.g. 'kafka.consumer={\"fetch.min.bytes\": 65536}' (repeatable)",
    )
    args = parser.parse_args()
    if args.seconds <= 2 * SETTLE_S:
        parser.error(f"--seconds must be above {2 * SETTLE_S:g}")
    logging.basicConfig(level=logging.WARNING)
    stack = find_stack()
    overrides: dict[str, Any] = {} if args.max_wait_ms is None else {"batch.max_wait_ms": args.max_wait_ms}
    for setting in args.set:
        key, _, value = setting.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {setting!r}: the value after '=' must be JSON")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        dataset = prepare(stack, directory, EVENTS, PARTITIONS)
        output = f"bench-{dataset.run_id}-out"
        config = streamserve_config(
            dataset, "rate-cost", dataset.events_topic, output, directory, overrides=overrides, layout=args.layout
        )
        ensure_topics({"bootstrap.servers": stack.bootstrap}, pipeline_topics(load_settings(config), PARTITIONS))
        worker = subprocess.Popen(
            [sys.executable, "-m", "streamserve", "run", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        load = None
        try:
            time.sleep(START_S)
            load = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench.loadgen", "--bootstrap", stack.bootstrap),
                    *("--topic", dataset.events_topic, "--payloads", str(dataset.payload_file)),
                    *("--rate", str(args.rate), "--seconds", str(args.seconds)),
                ],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(SETTLE_S)
            before, started = thread_ticks(worker.pid), time.monotonic()
            time.sleep(args.seconds - 2 * SETTLE_S)
            after, elapsed = thread_ticks(worker.pid), time.monotonic() - started
            if worker.poll() is not None:
                sys.exit(f"rate_cost: the worker exited with {worker.returncode}")
        finally:
            if load is not None:
                load.wait()
            worker.terminate()
            worker.wait(30)
            cleanup_redis(stack, dataset.run_id)
    hertz = os.sysconf("SC_CLK_TCK")
    cores = {name: (after[name] - before.get(name, 0)) / hertz / elapsed for name in after}
    total = sum(cores.values())
    wait = "the example pipeline's" if args.max_wait_ms is None else f"{args.max_wait_ms:g} ms"
    print(f"one worker at {args.rate:,.0f} events/s ({args.layout} features, max_wait_ms {wait}), {elapsed:.1f} s:")
    for setting in args.set:
        print(f"  with {setting}")
    for name, used in sorted(cores.items(), key=lambda item: -item[1]):
        if used >= 0.005:
            print(f"  {name:<16} {used:.3f} cores")
    print(f"  {'all threads':<16} {total:.3f} cores = {total / args.rate * 1e6:,.0f} us of CPU per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
