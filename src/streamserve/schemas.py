"""Where the project's Avro schemas live."""

from __future__ import annotations

import os
from pathlib import Path

import fastavro.types

from streamserve.pipeline.decode import load_schema


def schemas_dir() -> Path:
    """``$STREAMSERVE_SCHEMAS_DIR``, else the repository's schemas/ directory."""
    configured = os.environ.get("STREAMSERVE_SCHEMAS_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "schemas"


def bundled(name: str) -> fastavro.types.Schema:
    """A parsed schema from the schemas directory, by file stem."""
    return load_schema(schemas_dir() / f"{name}.avsc")
