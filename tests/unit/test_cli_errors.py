"""A first hour without tracebacks (issue 14, point 8): every command, run as a user runs it, against an
unreachable broker, an unreachable Redis and missing files answers with one line on stderr naming the server
or file, exit code 2, within its --timeout. No server is needed: the addresses are a closed port."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamserve.cli import build_parser
from streamserve.observe.kafkalog import RepeatedLines

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fraud" / "pipeline.yaml"
SAFETY_NET_S = 60
"""Only so a hung command fails the test instead of the suite; the commands run with --timeout 1."""


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cli(closed_port: int, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`python -m streamserve ARGS` with KAFKA_BOOTSTRAP_SERVERS and REDIS_URL at the closed port (as
    `scripts/stack env` would export them), no other STREAMSERVE_ settings, run from the repository root."""

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMSERVE_")}
        base |= {
            "PYTHONPATH": str(REPO / "src"),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed_port}",
            "REDIS_URL": f"redis://127.0.0.1:{closed_port}/0",
            "STREAMSERVE_CONTROL__ARTIFACT_CACHE_DIR": str(tmp_path / "cache"),
            "STREAMSERVE_STACK_DIR": str(tmp_path / "stack"),  # no local stack recorded, unless a test writes one
        }
        return subprocess.run(
            [sys.executable, "-m", "streamserve", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=base | env,
            timeout=SAFETY_NET_S,
        )

    return run


def assert_one_line(result: subprocess.CompletedProcess[str], *names: str) -> str:
    """Exit code 2, exactly one non-empty stderr line naming each of `names`, no traceback, no librdkafka line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "%3|" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    for name in names:
        assert name in lines[0]
    return lines[0]


def derived_config(tmp_path: Path, name: str = "pipeline.yaml", **sections: Any) -> Path:
    """The fraud example with some sections replaced (schema paths made absolute, so it can live in tmp_path)."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for section in ("input", "output"):
        config[section]["schema"] = str((EXAMPLE.parent / config[section]["schema"]).resolve())
    config.update(sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """Something where the model file should be: the preflight checks that it exists, never loads it."""
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not loaded before the servers answer")
    return path


@pytest.fixture
def event_only_config(tmp_path: Path) -> Path:
    """The fraud example without its Redis features, so Kafka is the first server a command needs."""
    features = [f for f in yaml.safe_load(EXAMPLE.read_text())["features"] if f["source"] == "event"]
    return derived_config(tmp_path, "event-only.yaml", features=features)


# --- an unreachable broker -----------------------------------------------------------------------------

BROKER_COMMANDS = {
    "topics create": ["topics", "create", "-c", str(EXAMPLE)],
    "acls grant": ["acls", "grant", "-c", str(EXAMPLE)],
    "produce": ["produce", "-c", str(EXAMPLE), "--count", "1"],
    "models status (env)": ["models", "status"],
    "models status -c": ["models", "status", "-c", str(EXAMPLE)],
    "models rollback": ["models", "rollback", "-c", str(EXAMPLE), "--model", "fraud"],
    "models quality": ["models", "quality", "-c", str(EXAMPLE)],
    "monitor": ["monitor", "-c", str(EXAMPLE)],
}


@pytest.mark.parametrize("command", BROKER_COMMANDS.values(), ids=BROKER_COMMANDS.keys())
def test_unreachable_broker_is_one_line_naming_it(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, command: list[str]
) -> None:
    line = assert_one_line(cli(*command, "--timeout", "1"), f"Kafka at 127.0.0.1:{closed_port}", "scripts/stack")
    assert "Connection refused" in line


def test_models_status_names_the_given_bootstrap_servers(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int
) -> None:
    result = cli("models", "status", "--bootstrap-servers", f"localhost:{closed_port}", "--timeout", "1")
    assert_one_line(result, f"Kafka at localhost:{closed_port}")


def test_models_publish_with_an_unreachable_broker(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, model_file: Path
) -> None:
    command = ["models", "publish", "-c", str(EXAMPLE), "--model", "fraud", "--version", "v9"]
    result = cli(*command, "--uri", str(model_file), "--no-validate", "--timeout", "1")
    assert_one_line(result, f"Kafka at 127.0.0.1:{closed_port}")


def test_run_with_an_unreachable_broker(
    cli: Callable[..., subprocess.CompletedProcess[str]],
    closed_port: int,
    event_only_config: Path,
    model_file: Path,
) -> None:
    result = cli("run", "-c", str(event_only_config), "--timeout", "1", STREAMSERVE_MODEL__URI=str(model_file))
    assert_one_line(result, f"Kafka at 127.0.0.1:{closed_port}", "within 1s")


def test_demo_checks_the_broker_before_training(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, event_only_config: Path
) -> None:
    result = cli("demo", "-c", str(event_only_config), "--timeout", "1")
    assert_one_line(result, f"Kafka at 127.0.0.1:{closed_port}")
    assert "training" not in result.stdout


def test_an_explicit_streamserve_variable_wins_over_the_stack_env(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int
) -> None:
    result = cli(
        "topics", "create", "-c", str(EXAMPLE), "--timeout", "1", STREAMSERVE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1"
    )
    assert_one_line(result, "Kafka at 127.0.0.1:1 ")


def test_the_local_stack_address_is_suggested_when_another_was_tried(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "stack.env").write_text("KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:39092\nREDIS_URL=redis://x\n")
    result = cli("topics", "create", "-c", str(EXAMPLE), "--timeout", "1", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1")
    assert_one_line(result, "Kafka at 127.0.0.1:1 ", "the local stack's is 127.0.0.1:39092", "scripts/stack env")


# --- an unreachable Redis ------------------------------------------------------------------------------


def test_run_with_an_unreachable_redis(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, model_file: Path
) -> None:
    result = cli("run", "-c", str(EXAMPLE), "--timeout", "1", STREAMSERVE_MODEL__URI=str(model_file))
    line = assert_one_line(result, f"Redis at redis://127.0.0.1:{closed_port}/0", "scripts/stack up")
    assert "refused the connection" in line, "a refused connection is no timeout (issue 27)"
    assert "within" not in line


def test_features_load_with_an_unreachable_redis(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, tmp_path: Path
) -> None:
    rows = tmp_path / "cards.csv"
    rows.write_text("card_id,avg_amount_30d\nc1,12.5\n")
    result = cli("features", "load", "--file", str(rows), "--key-template", "card:{card_id}", "--timeout", "1")
    assert_one_line(result, f"Redis at redis://127.0.0.1:{closed_port}/0")


def test_features_load_never_shows_the_password_of_the_url(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int, tmp_path: Path
) -> None:
    rows = tmp_path / "cards.csv"
    rows.write_text("card_id\nc1\n")
    url = f"redis://user:s3cret@127.0.0.1:{closed_port}/0"
    result = cli("features", "load", "--file", str(rows), "--key-template", "c:{card_id}", "--redis-url", url)
    line = assert_one_line(result, f"redis://user:***@127.0.0.1:{closed_port}/0")
    assert "s3cret" not in line


def test_demo_checks_redis_before_training(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int
) -> None:
    result = cli("demo", "--timeout", "1")
    assert_one_line(result, f"Redis at redis://127.0.0.1:{closed_port}/0")


# --- missing files -------------------------------------------------------------------------------------


def test_run_with_a_missing_model_file_says_how_to_create_it(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    missing = tmp_path / "models" / "fraud-v1.onnx"
    result = cli("run", "-c", str(EXAMPLE), STREAMSERVE_MODEL__URI=str(missing))
    assert_one_line(
        result, f"model file {missing} not found", "train or publish a model first", "make demo", "model.uri"
    )


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["topics", "create"],
        ["produce"],
        ["acls", "grant"],
        ["schemas", "check"],
        ["models", "status"],
        ["demo"],
    ],
    ids=" ".join,
)
def test_a_missing_config_file(cli: Callable[..., subprocess.CompletedProcess[str]], command: list[str]) -> None:
    assert_one_line(cli(*command, "-c", "no-such-pipeline.yaml"), "config file not found", "no-such-pipeline.yaml")


def test_features_load_with_a_missing_file(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = cli("features", "load", "--file", "no-such-features.csv", "--key-template", "card:{card_id}")
    assert_one_line(result, "feature file no-such-features.csv not found")


def test_produce_with_a_missing_schema(cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    config = yaml.safe_load(EXAMPLE.read_text())["input"] | {"schema": str(tmp_path / "gone.avsc")}
    result = cli("produce", "-c", str(derived_config(tmp_path, input=config)), "--timeout", "1")
    assert_one_line(result, "input schema", "gone.avsc")


def test_models_publish_with_a_missing_artifact(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    missing = tmp_path / "fraud-v9.onnx"
    command = ["models", "publish", "--model", "fraud", "--version", "v9", "--uri", str(missing), "--no-validate"]
    assert_one_line(cli(*command), f"artifact {missing} not found")


def test_models_rollback_with_a_missing_signing_key(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    key = tmp_path / "publisher.pem"
    result = cli("models", "rollback", "-c", str(EXAMPLE), "--model", "fraud", "--sign-key", str(key))
    assert_one_line(result, str(key))


def test_keys_generate_into_an_unwritable_place(
    cli: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line(cli("keys", "generate", "--out", str(blocker / "key.pem")), str(blocker))


def test_schemas_check_with_an_unreachable_registry(
    cli: Callable[..., subprocess.CompletedProcess[str]], closed_port: int
) -> None:
    registry = f"http://127.0.0.1:{closed_port}"
    result = cli(
        "schemas", "check", "-c", str(EXAMPLE), "--timeout", "1", STREAMSERVE_KAFKA__SCHEMA_REGISTRY_URL=registry
    )
    assert_one_line(result, f"Schema Registry at {registry}")


# --- help and librdkafka's log -------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_every_option_of_every_command_has_help() -> None:
    unexplained = [
        f"{parser.prog} {action.option_strings[0]}"
        for parser in _parsers(build_parser())
        for action in parser._actions
        if action.option_strings and (not action.help or action.help == argparse.SUPPRESS)
    ]
    assert unexplained == []


def test_librdkafka_repeats_are_logged_at_powers_of_ten() -> None:
    keep = RepeatedLines()
    passed = []
    for attempt in range(150):
        record = logging.LogRecord(
            "streamserve.librdkafka",
            logging.ERROR,
            __file__,
            0,
            "FAIL connect failed (after %dms in state CONNECT)",
            (attempt,),
            None,
        )
        if keep.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 3
    assert passed[1].endswith("(seen 10 times)")
    assert passed[2].endswith("(seen 100 times)")


def test_kafka_clients_log_through_python_logging(closed_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A client built from the settings sends librdkafka's lines to the `streamserve.librdkafka` logger."""
    from confluent_kafka import Consumer

    from streamserve.config import load_settings

    settings = load_settings(EXAMPLE, kafka={"bootstrap_servers": f"127.0.0.1:{closed_port}", "group_id": "t"})
    consumer = Consumer(settings.kafka.consumer_config())
    consumer.subscribe(["transactions"])
    with caplog.at_level(logging.INFO, logger="streamserve.librdkafka"):
        for _ in range(50):  # poll serves the log queue; a refused connection is logged at once
            consumer.poll(0.05)
            if any(r.name == "streamserve.librdkafka" for r in caplog.records):
                break
    consumer.close()
    assert any(
        f"127.0.0.1:{closed_port}" in r.getMessage() for r in caplog.records if r.name == "streamserve.librdkafka"
    )


def test_monitor_refuses_a_secured_broker_in_one_line(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = cli(
        "monitor", "-c", str(EXAMPLE), "--timeout", "1", STREAMSERVE_KAFKA__CLIENT='{"security.protocol": "SASL_SSL"}'
    )
    assert_one_line(result, "plaintext brokers only", "security.protocol=sasl_ssl")


def test_features_stream_refuses_a_secured_broker_in_one_line(
    cli: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    """faust's aiokafka client speaks plaintext only: a secured kafka.client is refused, never silently dropped."""
    result = cli(
        "features",
        "stream",
        "-c",
        str(EXAMPLE),
        "--timeout",
        "1",
        STREAMSERVE_KAFKA__CLIENT='{"security.protocol": "SASL_SSL"}',
    )
    assert_one_line(
        result, "streamserve features stream connects to plaintext brokers only", "security.protocol=sasl_ssl"
    )
