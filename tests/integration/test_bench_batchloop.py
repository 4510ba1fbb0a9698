"""The benchmark's hand-tuned batch loop (bench/jobs/batchloop.py) does the same work as streamserve.

Both run exactly as `make bench` starts them (bench.scenarios.commands), over the same benchmark events, with
the hash and the packed feature layout; every event gets the same score and label from both. The bench
itself does not check this: it only counts outputs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, cast

import fastavro
from bench.dataset import SCHEMAS, Dataset, Stack, cleanup_redis, delete_topics, prepare
from bench.scenarios import Scenario, commands, job_env, streamserve_topics

from tests.integration.harness import read_topic
from tests.integration.servers import Servers

EVENTS = 3000


def scored(dataset: Dataset, scenario: Scenario, work: Path) -> dict[str, tuple[float, int, str]]:
    """event_id -> (score, label, model version) of one system over the dataset's events."""
    output = dataset.topic(scenario.name)
    if scenario.kind == "streamserve":
        wide, narrow = streamserve_topics(output)
        dataset.create_topics(*wide)
        dataset.create_topics(*narrow, partitions=1)
    else:
        dataset.create_topics(output)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")} | job_env(scenario)
    (argv,) = commands(scenario, dataset, dataset.events_topic, output, work)
    with (work / f"{scenario.name}.log").open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        messages = read_topic(dataset.stack.bootstrap, output, EVENTS, timeout_s=120, settle_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(work / f'{scenario.name}.log').read_text()[-3000:]}") from exc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    schema = fastavro.parse_schema(json.loads((SCHEMAS / "prediction.avsc").read_text()))
    found: dict[str, tuple[float, int, str]] = {}
    for msg in messages:
        record = cast(dict[str, Any], fastavro.schemaless_reader(io.BytesIO(msg.value() or b""), schema, None))
        found[record["event_id"]] = (record["score"], record["label"], record["model_version"])
    return found


def test_the_batch_loop_scores_every_event_like_streamserve(stack: Servers, tmp_path: Path) -> None:
    dataset = prepare(Stack(stack.bootstrap_servers, stack.redis_url, {}), tmp_path, EVENTS, 4)
    work = tmp_path / "work"
    work.mkdir()
    try:
        for layout in ("hash", "packed"):
            reference = scored(dataset, Scenario(f"streamserve-{layout}", "streamserve", layout=layout), work)
            batchloop = scored(dataset, Scenario(f"batchloop-{layout}", "batchloop", layout=layout), work)
            assert len(reference) == EVENTS, f"{layout}: streamserve scored {len(reference)} of {EVENTS} events"
            assert batchloop.keys() == reference.keys(), f"{layout}: not the same events"
            differ = {i: (batchloop[i], reference[i]) for i in reference if batchloop[i] != reference[i]}
            assert not differ, f"{layout}: {len(differ)} events score differently, e.g. {list(differ.items())[:3]}"
    finally:
        cleanup_redis(dataset.stack, dataset.run_id)
        delete_topics(dataset.stack, dataset.run_id)
