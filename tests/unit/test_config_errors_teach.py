"""Config errors that teach (issue 27, item 5): each stumble a newcomer met, with the message that now fixes it.
Every command runs as a user runs it (`python -m streamserve`), against a closed port where a server is asked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamserve.config import load_settings
from streamserve.errors import ConfigError, RedisUnreachable
from streamserve.ops.preflight import check_redis, quick_redis

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fraud" / "pipeline.yaml"


@pytest.fixture(scope="module")
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def derived(tmp_path: Path, change: Any = None) -> Path:
    """The fraud example beside the test (schema paths made absolute), changed by ``change``."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for section in ("input", "output"):
        config[section]["schema"] = str((EXAMPLE.parent / config[section]["schema"]).resolve())
    if change is not None:
        change(config)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def streamserve(*args: str, closed_port: int, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
    base |= {
        "PYTHONPATH": str(REPO / "src"),
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}",
        "REDIS_URL": f"redis://127.0.0.1:{closed_port}/0",
    }
    return subprocess.run(
        [sys.executable, "-m", "streamserve", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=base | env,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one stderr line of a failed command (no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    return lines[0]


def test_an_unknown_key_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    path = derived(tmp_path, lambda c: c["batch"].update(max_wait=5))
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert (
        str(caught.value) == f"invalid pipeline config {path}: batch.max_wait: unknown key; did you mean `max_wait_ms`?"
    )


def test_an_unknown_feature_key_suggests_within_the_feature(tmp_path: Path) -> None:
    path = derived(tmp_path, lambda c: c["features"][0].update(feild="amount"))
    with pytest.raises(ConfigError, match=r"features\.0\.feild: unknown key; did you mean `field`\?"):
        load_settings(path)


def test_a_feature_field_not_in_the_schema_lists_the_fields_of_a_compatible_type(
    tmp_path: Path, closed_port: int
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"never loaded: the field is refused first")
    path = derived(tmp_path, lambda c: (c["features"][0].update(field="amout"), c["model"].update(uri=str(model))))
    line = one_line(streamserve("run", "-c", str(path), "--timeout", "1", closed_port=closed_port))
    assert "feature 'amount': field 'amout' is not in the event schema" in line
    fields = line.split("fields that fit a dtype float32 feature: ", 1)[1].split(", ")
    assert "amount" in fields
    assert "card_id" not in fields, "a string field is no compatible type for a number"
    # offline checks come before the servers: not "Kafka did not answer" although Kafka is a closed port
    assert "Kafka" not in line


def test_malformed_yaml_is_one_line_naming_where(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("input:\n  topic: a\n bad: [\n")
    line = one_line(streamserve("run", "-c", str(path), closed_port=closed_port))
    assert f"{path} is not valid YAML (line 3, column 2" in line


def test_a_yaml_list_is_no_config(tmp_path: Path, closed_port: int) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- input\n- features\n")
    assert "not a mapping" in one_line(streamserve("topics", "create", "-c", str(path), closed_port=closed_port))


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("STREAMSERVE_BATCHES__MAX_WAIT_MS", "did you mean STREAMSERVE_BATCH__MAX_WAIT_MS?"),
        ("STREAMSERVE_OBSERV__PORT", "did you mean STREAMSERVE_OBSERVE__PORT?"),
    ],
)
def test_a_typo_in_an_environment_section_is_reported(
    variable: str, suggestion: str, tmp_path: Path, closed_port: int
) -> None:
    result = streamserve("topics", "create", "-c", str(derived(tmp_path)), closed_port=closed_port, **{variable: "5"})
    line = one_line(result)
    assert f"environment variable {variable}: the pipeline config has no section" in line
    assert suggestion in line


def test_an_unknown_key_from_the_environment_is_blamed_on_the_variable(tmp_path: Path, closed_port: int) -> None:
    path = derived(tmp_path)
    line = one_line(
        streamserve("topics", "create", "-c", str(path), closed_port=closed_port, STREAMSERVE_BATCH__MAX_WAIT="5")
    )
    assert line == (
        f"streamserve: error: invalid environment setting(s) for {path}: batch.max_wait: unknown key; did you mean"
        " `max_wait_ms`? (set by environment variable STREAMSERVE_BATCH__MAX_WAIT)"
    )


def test_a_refused_redis_connection_says_refused_not_a_timeout(closed_port: int) -> None:
    url = f"redis://127.0.0.1:{closed_port}/0"
    client = quick_redis(url, 10.0)
    with pytest.raises(RedisUnreachable) as caught:
        check_redis(client, url, 10.0)
    assert f"Redis at {url} refused the connection" in str(caught.value)
    assert "10s" not in str(caught.value)


def test_stack_env_leaves_out_the_registry_url_streamserve_does_not_read(tmp_path: Path) -> None:
    """`export $(scripts/stack env)` sets what streamserve reads; the registry URL only with --registry-only."""
    (tmp_path / "stack.env").write_text(
        "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092\nREDIS_URL=redis://127.0.0.1:36379/0\n"
        "SCHEMA_REGISTRY_URL=http://127.0.0.1:38081/apis/ccompat/v7\nSCHEMA_REGISTRY_MANAGEMENT_PORT=38082\n"
    )

    def env(*flags: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "stack"), "--state-dir", str(tmp_path), "env", *flags],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.split()

    assert env() == ["KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092", "REDIS_URL=redis://127.0.0.1:36379/0"]
    assert "SCHEMA_REGISTRY_URL=http://127.0.0.1:38081/apis/ccompat/v7" in env("--registry-only")


def test_run_without_a_model_says_to_train_or_publish_one(tmp_path: Path, closed_port: int) -> None:
    missing = tmp_path / "models" / "my-model.onnx"
    path = derived(tmp_path, lambda c: c["model"].update(uri=str(missing)))
    line = one_line(streamserve("run", "-c", str(path), closed_port=closed_port))
    assert f"model file {missing} not found: train or publish a model first" in line
