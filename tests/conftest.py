"""Shared test configuration: the `integration` marker follows the directory."""

from __future__ import annotations

from pathlib import Path

import pytest

INTEGRATION_DIRS = ("integration",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(part in INTEGRATION_DIRS for part in Path(str(item.fspath)).parts):
            item.add_marker(pytest.mark.integration)
