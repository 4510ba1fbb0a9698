"""`schemas check` reads the effective compatibility level and always prints the reasons of a NO."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from streamserve.observe.logs import setup_logging
from streamserve.ops.schema_registry import _level, check_input

OLD = {"type": "record", "name": "E", "fields": [{"name": "id", "type": "string"}]}
NEW = {
    "type": "record",
    "name": "E",
    "fields": [{"name": "id", "type": "string"}, {"name": "amount", "type": "double"}],
}


class ApicurioLike:
    """Answers /config/<subject> with NONE (no subject setting) unless asked defaultToGlobal; says NO, no reason."""

    def __init__(self, level: str = "BACKWARD") -> None:
        self.level = level
        self.asked: list[tuple[str, Any]] = []
        self._rest_client = self

    def get(self, url: str, query: dict[str, str] | None = None) -> dict[str, str]:
        self.asked.append((url, query))
        return {"compatibilityLevel": self.level if query == {"defaultToGlobal": "true"} else "NONE"}

    def get_compatibility(self, subject: str | None = None) -> str:
        return "NONE"

    def get_latest_version(self, subject: str) -> Any:
        return SimpleNamespace(version=1, schema_id=7, schema=SimpleNamespace(schema_str=json.dumps(OLD)))

    def test_compatibility(self, subject: str, schema: Any) -> bool:
        return False


def test_the_effective_level_is_asked_with_default_to_global() -> None:
    client = ApicurioLike()
    assert _level(client, "tx-value") == "BACKWARD"
    assert client.asked == [("config/tx-value", {"defaultToGlobal": "true"})]


def test_a_no_prints_its_reasons(tmp_path: Path) -> None:
    reader = tmp_path / "reader.avsc"
    reader.write_text(json.dumps(NEW))
    settings = SimpleNamespace(input=SimpleNamespace(subject=None, topic="tx", schema_path=reader))
    check = check_input(settings, ApicurioLike())  # type: ignore[arg-type]
    assert not check.ok
    assert "registry (BACKWARD): the reader schema is NOT compatible with 'tx-value'" in check.lines
    (reason,) = [line for line in check.lines if line.startswith("cannot resolve")]
    assert "amount" in reason, check.lines


def test_a_no_the_reader_resolves_still_names_the_rule_it_breaks(tmp_path: Path) -> None:
    reader = tmp_path / "reader.avsc"
    reader.write_text(json.dumps({"type": "record", "name": "E", "fields": []}))  # reads OLD; OLD cannot read it
    settings = SimpleNamespace(input=SimpleNamespace(subject=None, topic="tx", schema_path=reader))
    check = check_input(settings, ApicurioLike("FORWARD"))  # type: ignore[arg-type]
    assert not check.ok
    assert "resolves: the reader schema reads it" in check.lines
    (reason,) = [line for line in check.lines if line.startswith("readers of the registered schema")]
    assert "id" in reason, check.lines


def test_the_registry_clients_http_lines_are_quiet_unless_debug() -> None:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    SchemaRegistryClient({"url": "http://127.0.0.1:9", "timeout": 1})  # its HTTP library is imported by now
    http = {name.split(".")[0] for name in sys.modules if name.split(".")[0] in ("httpx", "httpx2")}
    assert http, "the registry client's HTTP library is neither httpx nor httpx2"
    for name in http:
        setup_logging("INFO")
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING, name
        setup_logging("DEBUG")
        assert logging.getLogger(name).getEffectiveLevel() == logging.DEBUG, name
    setup_logging("INFO")
