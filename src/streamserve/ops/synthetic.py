"""Synthetic events from an Avro schema, for ``streamserve check`` and ``produce`` on a schema of one's own.

Every type is honoured: unions (a null now and then in a nullable field), enums, nested records, arrays and
maps, fixed and bytes, the logical types (timestamps near now, dates, uuids, decimals). Values are seeded, so
two runs give the same events (times and dates aside: they are near the time of the run). Id fields (names
ending in ``id``) take values from a small pool of entities - ``<field>-0`` ... ``<field>-49`` - so features
loaded for those keys are found; the event-id field is unique per event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

ENTITIES = 50
"""Distinct values of each id field (``<field>-0`` ... ``<field>-49``): the keys to load features for."""
TEXT_VALUES = 3
"""Distinct values of other string fields (``<field>-0`` ... ``<field>-2``)."""


@dataclass
class EventMaker:
    """Makes events of one record schema (JSON form); see the module docstring."""

    schema: dict[str, Any]
    seed: int = 0
    unique: Collection[str] = ()
    """Field paths whose value differs in every event (the event id)."""
    lengths: Mapping[str, int] = field(default_factory=dict)
    """Array field paths and the length their events need (vector features)."""
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """String field paths and the values to pick from (the categories a model knows)."""
    null_share: float = 0.1
    """Share of nullable values that are null."""

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._named: dict[str, Any] = {}
        self._now_ms = int(time.time() * 1000)
        self._index = 0

    def events(self, count: int) -> Iterator[dict[str, Any]]:
        """``count`` events."""
        for index in range(count):
            self._index = index
            yield self._value(self.schema, "")

    def _value(self, node: Any, path: str) -> Any:
        if isinstance(node, list):
            return self._union(node, path)
        if isinstance(node, str):
            node = self._named.get(node) or self._named.get(node.rsplit(".", 1)[-1]) or {"type": node}
        elif isinstance(node.get("type"), (dict, list)) and "name" not in node:
            return self._value(node["type"], path)
        self._register(node)
        kind = node["type"]
        if kind == "record":
            return {
                f["name"]: self._value(f["type"], f"{path}.{f['name']}" if path else f["name"]) for f in node["fields"]
            }
        if kind == "enum":
            return str(self._rng.choice(node["symbols"]))
        if kind == "array":
            size = self.lengths.get(path, int(self._rng.integers(1, 5)))
            return [self._value(node["items"], f"{path}[]") for _ in range(size)]
        if kind == "map":
            return {f"k{i}": self._value(node["values"], f"{path}{{}}") for i in range(int(self._rng.integers(1, 3)))}
        return self._primitive(kind, node.get("logicalType"), node, path)

    def _register(self, node: dict[str, Any]) -> None:
        if node.get("type") in ("record", "enum", "fixed") and "name" in node:
            name, namespace = node["name"], node.get("namespace")
            self._named.setdefault(name, node)
            if namespace and "." not in name:
                self._named.setdefault(f"{namespace}.{name}", node)

    def _union(self, branches: list[Any], path: str) -> Any:
        others = [b for b in branches if b != "null" and not (isinstance(b, dict) and b.get("type") == "null")]
        if len(others) < len(branches) and (not others or self._rng.random() < self.null_share):
            return None
        return self._value(others[int(self._rng.integers(0, len(others)))], path)

    def _primitive(self, kind: str, logical: str | None, node: dict[str, Any], path: str) -> Any:  # noqa: C901
        rng, leaf = self._rng, path.rsplit(".", 1)[-1]
        if kind == "null":
            return None
        if kind == "boolean":
            return bool(rng.random() < 0.5)
        if logical in ("timestamp-millis", "local-timestamp-millis"):
            return self._now_ms - int(rng.integers(0, 3_600_000))
        if logical in ("timestamp-micros", "local-timestamp-micros"):
            return (self._now_ms - int(rng.integers(0, 3_600_000))) * 1000
        if logical == "date":
            return self._now_ms // 86_400_000 - int(rng.integers(0, 30))
        if logical in ("time-millis", "time-micros"):
            return int(rng.integers(0, 86_400_000)) * (1000 if logical == "time-micros" else 1)
        if logical == "decimal":
            return Decimal(int(rng.integers(0, 100_000))).scaleb(-int(node.get("scale", 0)))
        if kind in ("int", "long"):
            return self._index + 1_000_000 * self.seed if path in self.unique else int(rng.integers(0, 100))
        if kind in ("float", "double"):
            return round(float(rng.uniform(0, 100)), 3)
        if kind == "string":
            return self._text(leaf, logical, path)
        if kind == "bytes":
            return bytes(rng.integers(0, 256, 8, dtype=np.uint8))
        if kind == "fixed":
            return bytes(rng.integers(0, 256, int(node["size"]), dtype=np.uint8))
        raise ValueError(f"field {path or '(event)'}: cannot make a value of Avro type {kind!r}")

    def _text(self, leaf: str, logical: str | None, path: str) -> str:
        rng = self._rng
        if logical == "uuid":
            return str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | self._index))
        if path in self.unique:
            return f"{leaf}-{self.seed}-{self._index}"
        if self.choices.get(path):
            options = self.choices[path]
            return str(options[int(rng.integers(0, len(options)))])
        pool = ENTITIES if leaf.lower().endswith("id") else TEXT_VALUES
        return f"{leaf}-{int(rng.integers(0, pool))}"
