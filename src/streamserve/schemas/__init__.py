"""The project's Avro schemas, shipped inside the package (a wheel installed anywhere carries them).

The repository's top-level ``schemas`` is a link to this directory, so example pipelines can name the files
by relative path; code loads them through :mod:`importlib.resources` only.
"""

from __future__ import annotations

import json
from importlib import resources

import fastavro
import fastavro.types

from streamserve.errors import ConfigError


def schema_text(name: str) -> str:
    """The JSON text of a bundled schema, by file stem (e.g. ``"prediction"``)."""
    resource = resources.files(__name__) / f"{name}.avsc"
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"Avro schema {name!r} is not bundled with streamserve (no {name}.avsc)") from exc


def bundled(name: str) -> fastavro.types.Schema:
    """A parsed schema bundled with the package, by file stem."""
    return fastavro.parse_schema(json.loads(schema_text(name)))


def names() -> list[str]:
    """Stems of every bundled schema."""
    return sorted(p.name.removesuffix(".avsc") for p in resources.files(__name__).iterdir() if p.name.endswith(".avsc"))
