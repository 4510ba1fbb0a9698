"""`streamserve backtest` and `streamserve dlq` without servers or with bad arguments: one line on stderr naming
what is wrong, exit code 2, never a traceback (as every command, tests/unit/test_cli_errors.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.unit.test_cli_errors import EXAMPLE, assert_one_line, cli, closed_port, model_file

__all__ = ["cli", "closed_port", "model_file"]  # fixtures used here

Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.mark.parametrize(
    "command",
    [["dlq", "inspect"], ["dlq", "replay"], ["dlq", "replay", "--dry-run"]],
    ids=" ".join,
)
def test_an_unreachable_broker_is_one_line_naming_it(cli: Cli, closed_port: int, command: list[str]) -> None:
    assert_one_line(cli(*command, "-c", str(EXAMPLE), "--timeout", "1"), f"Kafka at 127.0.0.1:{closed_port}")


@pytest.mark.parametrize(
    "command",
    [["dlq", "inspect"], ["dlq", "replay"], ["backtest", "--candidate", "v2", "--from", "beginning"]],
    ids=" ".join,
)
def test_a_missing_config_file(cli: Cli, command: list[str]) -> None:
    assert_one_line(cli(*command, "-c", "no-such-pipeline.yaml"), "config file not found", "no-such-pipeline.yaml")


def test_backtest_without_a_candidate_says_how_to_give_one(cli: Cli) -> None:
    assert_one_line(cli("backtest", "-c", str(EXAMPLE), "--from", "beginning"), "--candidate", "--candidate-uri")


@pytest.mark.parametrize("position", ["yesterday", "0:x", "2026-13-45"])
def test_a_position_that_means_nothing(cli: Cli, position: str) -> None:
    result = cli("backtest", "-c", str(EXAMPLE), "--candidate", "v2", f"--from={position}")
    assert_one_line(result, repr(position), "ISO 8601")


def test_dlq_since_that_means_nothing(cli: Cli) -> None:
    assert_one_line(cli("dlq", "inspect", "-c", str(EXAMPLE), "--since", "lastweek"), "'lastweek'")


def test_backtest_with_unreachable_servers_names_one(cli: Cli, tmp_path: Path, model_file: Path) -> None:
    config = tmp_path / "pipeline.yaml"
    text = EXAMPLE.read_text().replace("models/fraud-v1.onnx", str(model_file))
    text = text.replace("../../schemas/", str(EXAMPLE.parent.parent.parent / "schemas") + "/")
    config.write_text(text)
    result = cli("backtest", "-c", str(config), "--candidate", "v2", "--from", "beginning", "--timeout", "1")
    line = assert_one_line(result)
    assert "Redis" in line or "Kafka" in line
