"""`streamserve demo` as `make demo` runs it, on the real broker and Redis: every prediction uses the streamed
transaction count (no default), and the run ends with the v1 vs v2 quality table the monitor computed from the
labels the demo produced."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamserve.config import config_from
from tests.integration.harness import EXAMPLE_PIPELINE
from tests.integration.servers import Servers

pytestmark = pytest.mark.integration

ROW = re.compile(r"^\s+(v[12])\s+(\w+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(measured|estimated)\s", re.M)
"""A version row of the quality table: version, role, preds, labelled, never, pending, late, status."""


def test_demo_scores_with_the_streamed_count_and_ends_with_the_quality_table(stack: Servers, tmp_path: Path) -> None:
    config = config_from(EXAMPLE_PIPELINE, {"model.uri": str(tmp_path / "models" / "fraud-v1.onnx")})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
    environment |= {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers, "REDIS_URL": stack.redis_url}
    events = 6000
    done = subprocess.run(
        [sys.executable, "-m", "streamserve", "demo", "-c", str(path), "--events", str(events), "--partitions", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        check=False,
    )
    output = done.stdout
    assert done.returncode == 0, f"{output[-3000:]}\n{done.stderr[-3000:]}"
    assert "feature defaults: 0 missing" in output, "a prediction used txn_count_24h's default, not the streamed count"
    found = re.search(r"streamed feature: txn_count_24h of (\d+)/(\d+) cards", output)
    assert found, output[-2000:]
    assert found.group(1) == found.group(2), "every card's streamed count in Redis equals the demo's own count"

    labelled = re.search(r"quality:\s+(\d+) labels 1-5 h late in event time, (\d+) never", output)
    assert labelled, output[-2000:]
    rows = ROW.findall(output)
    assert {row[0] for row in rows} == {"v1", "v2"}, output[-2000:]
    preds = sum(int(row[2]) for row in rows)
    assert preds == events, "the monitor saw every prediction once"
    assert sum(int(row[3]) for row in rows) == int(labelled.group(1)), "every label the demo produced joined once"
    for _, _, n, joined, never, pending, _, status in rows:
        assert int(joined) + int(never) + int(pending) == int(n)
        assert status == "measured"
    assert int(labelled.group(2)) > 0, "some labels never come"
    assert sum(int(row[6]) for row in rows) > 0, "labels hours after their event are late for their window"
    assert re.search(r"v2 \(\w+\) vs v1 \(\w+\)|v1 \(\w+\) vs v2 \(\w+\)", output), "the comparison line"
