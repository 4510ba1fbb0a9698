"""The reference profile of a version, as ``models publish --reference FILE`` builds it.

The sample (Parquet or CSV, one column per feature name) holds the model's inputs as the worker feeds them: the
feature log's form, so an export of served rows is a valid reference. Numbers, text categories, vocabulary
features as their category text (or already encoded), vectors as Parquet lists. Empty cells are missing: they
count in the missing bin and are scored with the feature's default. The model scores the sample, so the score's
distribution is profiled too. The profile file is written beside the artifact; its digest goes into the
signed announcement, and the workers verify it with the model (control/registry.py).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.control.fetch import fetch, sha256_hex
from streamserve.errors import ConfigError
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.profile import ReferenceProfile, build_profile

PROFILE_SUFFIX = ".profile.json"


def read_sample(path: Path) -> Any:
    """The reference sample as a pyarrow Table (Parquet, or CSV by its suffix); ConfigError when unreadable."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".csv", ".txt"):
            return pacsv.read_csv(path)
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"cannot read the reference sample {path}: {exc}") from exc


def served_columns(table: Any, features: Sequence[FeatureSpec]) -> dict[str, np.ndarray]:
    """One column per feature as the worker would feed it (missing values as NaN or None)."""
    absent = [spec.name for spec in features if spec.name not in table.column_names]
    if absent:
        raise ConfigError(f"the reference sample has no column for features {absent} (it has {table.column_names})")
    return {spec.name: _served(spec, table.column(spec.name).to_pylist()) for spec in features}


def _served(spec: FeatureSpec, values: list[Any]) -> np.ndarray:
    if spec.encoding != "none" and any(isinstance(v, str) for v in values):
        vocabulary = {category: i for i, category in enumerate(spec.vocabulary or ())}
        unknown = len(vocabulary)
        codes = np.array([np.nan if v is None else vocabulary.get(str(v), unknown) for v in values], dtype=np.float64)
        if spec.encoding == "ordinal":
            return codes
        onehot = np.zeros((len(values), unknown + 1))
        present = ~np.isnan(codes)
        onehot[np.flatnonzero(present), codes[present].astype(np.intp)] = 1.0
        onehot[~present] = np.nan
        return onehot
    if spec.text:
        return np.array([None if v is None or v == "" else str(v) for v in values], dtype=object)  # CSV: ""
    if spec.width > 1:
        rows = [[np.nan] * spec.width if v is None else v for v in values]
        try:
            matrix = np.array(rows, dtype=np.float64)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"feature {spec.name!r}: {spec.width} numbers per row expected (a Parquet list)") from exc
        if matrix.shape != (len(values), spec.width):
            raise ConfigError(f"feature {spec.name!r}: {spec.width} numbers per row expected, got {matrix.shape[1:]}")
        return matrix
    try:
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"feature {spec.name!r}: the reference sample holds a value that is no number") from exc


def score_sample(model: OnnxModel, features: Sequence[FeatureSpec], columns: dict[str, np.ndarray]) -> np.ndarray:
    """The model's scores on the rows it can be fed: missing values take their feature's default, rows still
    missing one are left out."""
    filled: dict[str, np.ndarray] = {}
    complete = np.ones(len(next(iter(columns.values()))), dtype=bool)
    for spec in features:
        column = columns[spec.name]
        if column.dtype == object:
            missing = np.array([v is None for v in column.tolist()], dtype=bool)
            if spec.default is not None:
                column = np.where(missing, str(spec.default), column).astype(object)
                missing[:] = False
        else:
            missing = np.isnan(column).any(axis=1) if column.ndim == 2 else np.isnan(column)
            if spec.default is not None and column.ndim == 1 and not isinstance(spec.default, str):
                column = np.where(missing, float(spec.default), column)
                missing[:] = False
        filled[spec.name] = column
        complete &= ~missing
    rows = np.flatnonzero(complete)
    if not len(rows):
        raise ConfigError("no row of the reference sample has every feature: nothing to score")
    return model.predict({name: column[rows] for name, column in filled.items()}).score


def profile_uri(artifact_uri: str) -> tuple[str, Path]:
    """The profile's URI beside a local artifact, and its path; ConfigError for a remote artifact."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
        return f"file://{urllib.parse.quote(str(path))}{PROFILE_SUFFIX}", Path(f"{path}{PROFILE_SUFFIX}")
    if parsed.scheme:
        raise ConfigError(
            "--reference stores the profile beside the artifact: give --uri a local path or file:// URI "
            "(upload both files together for http(s) serving)"
        )
    return f"{artifact_uri}{PROFILE_SUFFIX}", Path(f"{artifact_uri}{PROFILE_SUFFIX}")


def write_profile(
    sample: Path, model_settings: ModelSettings, features: Sequence[FeatureSpec], version: str, artifact_uri: str
) -> tuple[str, str, ReferenceProfile]:
    """Profile a sample for a version, write it beside the artifact; (profile URI, its sha256, the profile)."""
    uri, path = profile_uri(artifact_uri)
    columns = served_columns(read_sample(sample), features)
    model = OnnxModel.load(fetch(artifact_uri), model_settings, version, features)
    profile = build_profile(model_settings.name, version, features, columns, score_sample(model, features, columns))
    data = profile.to_bytes()
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ConfigError(f"cannot write the reference profile {path}: {exc.strerror}") from exc
    return uri, sha256_hex(data), profile
