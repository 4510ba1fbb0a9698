"""The demo's output is for a person (issue 27, item 4): its steps and summary, no JSON log line; the worker's log
goes to a text file the demo names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from streamserve.config import config_from
from tests.integration.harness import EXAMPLE_PIPELINE
from tests.integration.servers import Servers


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def test_the_demo_prints_its_steps_and_names_the_workers_text_log(stack: Servers, tmp_path: Path) -> None:
    config = config_from(EXAMPLE_PIPELINE, {"model.uri": str(tmp_path / "models" / "fraud-v1.onnx")})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
    env |= {"KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers, "REDIS_URL": stack.redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "streamserve", "demo", "-c", str(path), "--events", "2000"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the feature app's faust data directory lands in the working directory
        timeout=400,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert not [line for line in lines if _is_json(line)], f"JSON log lines in the demo's output:\n{output}"
    assert lines[-1].startswith("demo OK"), output
    assert any(line.startswith("[6/6] summary") for line in lines)
    named = next(line for line in lines if line.startswith("the worker's log: "))
    log = Path(named.removeprefix("the worker's log: "))
    assert log.parent == tmp_path / "data"
    written = log.read_text().splitlines()
    assert any("serving fraud v1" in line for line in written), "the worker's own lines are in the file"
    assert not [line for line in written if _is_json(line)], "text, whatever the terminal"
