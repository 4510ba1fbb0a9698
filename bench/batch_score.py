"""The batch-scoring phase (issue 25): `streamserve score` pinned to one core over the bench's own events, written
as a Parquet file, with the features from the bench's Redis hashes; rows/s to compare with streamserve-1's events/s.

In `make bench` it runs after the components (bench.run); alone, `python -m bench.batch_score [--events N]` trains
the demo models, loads the entities under its own Redis prefix and measures the phase only (no Kafka).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from bench.dataset import SCHEMAS, Dataset, cleanup_redis, encode_events, find_stack, load_entities
from bench.scenarios import streamserve_config
from streamserve.demo.data import make_entities
from streamserve.demo.train import train_versions
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema

_RATE = re.compile(r"\(([\d,]+) rows/s")
_LOAD = re.compile(r"after ([\d.]+)s loading the model")


def batch_score(dataset: Dataset, directory: Path, rows: int | None = None) -> dict[str, Any]:
    """Score the dataset's events (the first ``rows``) from a Parquet file on one core; the summary's figures."""
    decode = LocalSchemaDecoder(load_schema(SCHEMAS / "card_transaction.avsc"))
    payloads = dataset.payloads[:rows] if rows else dataset.payloads
    events = decode.decode_many([value for _, value in payloads])
    source = directory / "batch-score-events.parquet"
    pq.write_table(pa.Table.from_pylist(events), source, row_group_size=65_536)
    output = dataset.topic("batch-score-out")
    config = streamserve_config(dataset, "batch-score", dataset.events_topic, output, directory)
    command = [sys.executable, "-m", "streamserve", "score", "-c", str(config), "--input", str(source)]
    command += ["--output", str(directory / "batch-score-predictions.parquet")]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, preexec_fn=lambda: os.sched_setaffinity(0, {0})
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"streamserve score failed: {done.stderr.strip()[-500:]}")
    match, load = _RATE.search(done.stdout), _LOAD.search(done.stdout)
    return {
        "rows": len(events),
        "rows_per_s": float(match.group(1).replace(",", "")) if match else None,
        "model_load_s": float(load.group(1)) if load else None,
        "wall_s": round(wall, 2),
        "cores": 1,
        "command": " ".join(["taskset -c 0", Path(sys.executable).name, *command[1:]]),
        "summary": done.stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the phase alone (trains the demo models, loads the entities under a prefix of its own)."""
    parser = argparse.ArgumentParser(prog="python -m bench.batch_score", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="events to score (200000)")
    args = parser.parse_args(argv)
    stack = find_stack()
    run_id = "batchscore-" + uuid.uuid4().hex[:6]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        entities = make_entities()
        models = {m.version: m.path for m in train_versions(entities, directory / "models")}
        prefix = f"bench-{run_id}:"
        client = redis.Redis.from_url(stack.redis_url)
        load_entities(client, entities, prefix)
        client.close()
        payloads = encode_events(entities, args.events)
        dataset = Dataset(run_id, stack, "unused", 1, payloads, directory / "none", prefix, prefix, models, entities)
        try:
            result = batch_score(dataset, directory)
        finally:
            cleanup_redis(stack, run_id)
    print(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2))
    print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
