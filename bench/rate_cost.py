"""CPU of one streamserve worker at a fixed offered rate, per thread: what a worker costs below its maximum.

    python -m bench.rate_cost --rate 300 [--seconds 14] [--max-wait-ms 10] [--layout hash]
                              [--set 'kafka.consumer={"fetch.min.bytes": 1}' ...]

Against the local stack (`python3 scripts/stack up`): the bench's events, models and features (a fresh run id,
its topics and keys deleted after), one worker started as the bench starts it (examples/fraud/pipeline.yaml plus
the bench's overrides) on a fresh input topic, and the bench's load generator at the given rate. Over the middle
of the run it reads the CPU of the worker's threads (psutil; names from /proc: the Python main thread,
librdkafka's broker threads and its main thread) and prints them in cores, with the CPU per event. Below the
maximum a worker scores ~1000 / max_wait_ms batches a second, each with a cost of its own, so this is what sets
its CPU at low and moderate rates (docs/running.md, `batch.max_wait_ms`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.dataset import cleanup_redis, delete_topics, find_stack, prepare
from bench.phases import Settings, start_job, start_loadgen
from bench.procs import cpu_seconds, thread_waits
from bench.scenarios import Scenario

PARTITIONS = 8
EVENTS = 20_000
"""Distinct events the load generator cycles through."""
START_S = 8.0
"""Seconds the worker gets to join its group before the load starts."""
SETTLE_S = 3.0
"""Seconds of load before CPU is counted, and left out at the end."""


def thread_stats(pid: int) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """(CPU seconds, seconds runnable but waiting for a CPU) per thread name of a process; librdkafka's broker
    threads as one."""
    spent: collections.Counter[str] = collections.Counter()
    waited: collections.Counter[str] = collections.Counter()
    waits = thread_waits(pid)
    for thread in psutil.Process(pid).threads():
        with contextlib.suppress(OSError):  # the thread ended
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            name = "rdk:broker*" if name.startswith("rdk:broker") else name
            spent[name] += thread.user_time + thread.system_time
            waited[name] += waits.get(thread.id, 0.0)
    return spent, waited


def process_cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process; a server not running here (a remote stack) is left out."""
    spent = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            spent[name] = cpu_seconds(psutil.Process(pid))
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, required=True, help="offered events per second")
    parser.add_argument("--seconds", type=float, default=14.0, help="seconds of load (CPU counted over all but 6)")
    parser.add_argument("--max-wait-ms", type=float, help="batch.max_wait_ms (default: the example pipeline's)")
    parser.add_argument("--layout", choices=["hash", "packed"], default="hash", help="Redis feature layout")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a pipeline setting for the worker, e.g. 'kafka.consumer={\"fetch.min.bytes\": 1}' (repeatable)",
    )
    args = parser.parse_args()
    if args.seconds <= 2 * SETTLE_S:
        parser.error(f"--seconds must be above {2 * SETTLE_S:g}")
    overrides: dict[str, Any] = {} if args.max_wait_ms is None else {"batch.max_wait_ms": args.max_wait_ms}
    for setting in args.set:
        key, _, value = setting.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {setting!r}: the value after '=' must be JSON")
    logging.basicConfig(level=logging.WARNING)
    stack = find_stack()
    scenario = Scenario("rate-cost", "streamserve", 1, overrides=overrides, layout=args.layout)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare(stack, Path(tmp), EVENTS, PARTITIONS)
        input_topic, output_topic = dataset.topic("rate-cost-in"), dataset.topic("rate-cost-out")
        dataset.create_topics(input_topic)
        job = start_job(scenario, dataset, Settings(out_dir=Path(tmp)), input_topic, output_topic, "rate")
        load = None
        try:
            time.sleep(START_S)
            job.check_alive()
            load = start_loadgen(dataset, input_topic, args.rate, args.seconds)
            time.sleep(SETTLE_S)
            others = {"load generator": load.pid, **stack.server_pids}
            (before, waited_before), before_others = thread_stats(job.pids[0]), process_cpu(others)
            started = time.monotonic()
            time.sleep(args.seconds - 2 * SETTLE_S)
            (after, waited_after), elapsed = thread_stats(job.pids[0]), time.monotonic() - started
            after_others = process_cpu(others)
            job.check_alive()
        finally:
            if load is not None:
                load.wait()
            job.stop()
            cleanup_redis(stack, dataset.run_id)
            delete_topics(stack, dataset.run_id)
    cores = {name: (after[name] - before.get(name, 0.0)) / elapsed for name in after}
    total = sum(cores.values())
    wait = "the example pipeline's" if args.max_wait_ms is None else f"{args.max_wait_ms:g} ms"
    print(f"one worker at {args.rate:,.0f} events/s ({args.layout} features, max_wait_ms {wait}), {elapsed:.1f} s:")
    for setting in args.set:
        print(f"  with {setting}")
    for name, used in sorted(cores.items(), key=lambda item: -item[1]):
        if used >= 0.005:
            waited = waited_after[name] - waited_before[name]
            print(f"  {name:<16} {used:.3f} cores, waited {waited / elapsed:.3f} s/s for a CPU")
    print(f"  {'all threads':<16} {total:.3f} cores = {total / args.rate * 1e6:,.0f} us of CPU per event")
    print("beside it, on the same machine:")
    for name, spent in after_others.items():
        if name in before_others:
            print(f"  {name:<16} {(spent - before_others[name]) / elapsed:.3f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
