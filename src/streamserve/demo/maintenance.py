"""The predictive-maintenance example: machine readings, a multi-input scikit-learn pipeline, string labels.

Unlike the fraud demo, the events have a nested record, nullable fields, enums, an array, a decimal and a
nullable event time; the model is a scikit-learn Pipeline (ColumnTransformer + OneHotEncoder + scaler +
classifier) converted by skl2onnx into a model with several named inputs (strings and floats) and string
class labels. Everything here is computed from the raw readings without streamserve's feature code, so
tests can score the same readings offline and compare.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODELS = ("PUMP_A", "PUMP_B", "COMPRESSOR", "TURBINE")
MODES = ("IDLE", "NORMAL", "PEAK", "MAINTENANCE")
MODE_VOCABULARY = ("IDLE", "NORMAL", "PEAK")
"""The vocabulary the model was trained with (MAINTENANCE falls in the unknown column)."""
SITES = ("north", "south", "harbor")
ERRORS = ("none", "E101", "E202", "E303")
CLASSES = ("failure_imminent", "ok", "service_soon")
STRING_INPUTS = ("machine_model", "site", "last_error")
FLOAT_INPUTS = ("temperature_c", "pressure_bar", "load_pct", "firmware_major", "hours_since_service")
VIBRATION_AXES = 4
TEMPERATURE_DEFAULT = 60.0


@dataclass(frozen=True)
class Machines:
    """Per machine: its model, and the maintenance features kept in Redis (hash ``machine:{id}``)."""

    models: dict[str, str]
    redis: dict[str, dict[str, str]]


def make_machines(count: int = 300, seed: int = 5) -> Machines:
    """Machines with a model each; most have maintenance features in Redis, some have none."""
    rng = np.random.default_rng(seed)
    models, stored = {}, {}
    for i in range(count):
        machine_id = f"m-{i:05d}"
        models[machine_id] = MODELS[int(rng.integers(len(MODELS)))]
        if rng.random() < 0.9:  # the others have no hash: their features take the defaults
            stored[machine_id] = {
                "hours_since_service": f"{float(rng.gamma(2.0, 400.0)):.1f}",
                "last_error": ERRORS[int(rng.choice(len(ERRORS), p=[0.7, 0.12, 0.1, 0.08]))],
            }
    return Machines(models, stored)


def make_readings(machines: Machines, count: int, seed: int = 11) -> Iterator[dict[str, Any]]:
    """Readings as the Avro schema (schemas/machine_reading.avsc) has them, with nulls where it allows."""
    rng = np.random.default_rng(seed)
    ids = list(machines.models)
    start = int(time.time() * 1000)
    for i in range(count):
        machine_id = ids[int(rng.integers(len(ids)))]
        model = machines.models[machine_id]
        base = {"PUMP_A": 55.0, "PUMP_B": 60.0, "COMPRESSOR": 70.0, "TURBINE": 80.0}[model]
        yield {
            "reading_id": str(uuid.UUID(int=int(rng.integers(2**62)) << 64 | i)),
            "machine_id": machine_id,
            "site": None if rng.random() < 0.1 else SITES[int(rng.integers(len(SITES)))],
            "machine": {
                "model": model,
                "firmware": {"major": int(rng.integers(1, 5)), "minor": int(rng.integers(0, 10))},
            },
            "mode": MODES[int(rng.choice(len(MODES), p=[0.15, 0.6, 0.2, 0.05]))],
            "temperature_c": None if rng.random() < 0.05 else round(float(rng.normal(base, 8.0)), 2),
            "pressure_bar": float(np.float32(rng.normal(6.0, 1.0))),
            "vibration_rms": rng.gamma(2.0, 0.6, VIBRATION_AXES).astype(np.float32).tolist(),
            "load_pct": Decimal(f"{float(rng.uniform(5, 100)):.2f}"),
            "event_time": None if rng.random() < 0.05 else start + i,
        }


def model_inputs(readings: list[dict[str, Any]], machines: Machines) -> dict[str, np.ndarray]:
    """The model's inputs for readings, built directly from the raw values (as the pipeline config says)."""
    n = len(readings)
    stored = [machines.redis.get(r["machine_id"], {}) for r in readings]

    def text(values: list[str]) -> np.ndarray:
        return np.array(values, dtype=object).reshape(n, 1)

    def floats(values: list[float]) -> np.ndarray:
        return np.array(values, dtype=np.float32).reshape(n, -1)

    modes = np.zeros((n, len(MODE_VOCABULARY) + 1), dtype=np.float32)
    for row, reading in enumerate(readings):
        mode = reading["mode"]
        modes[row, MODE_VOCABULARY.index(mode) if mode in MODE_VOCABULARY else len(MODE_VOCABULARY)] = 1.0
    return {
        "machine_model": text([r["machine"]["model"] for r in readings]),
        "site": text([r["site"] if r["site"] is not None else "unknown" for r in readings]),
        "last_error": text([s.get("last_error", "none") for s in stored]),
        "temperature_c": floats(
            [r["temperature_c"] if r["temperature_c"] is not None else TEMPERATURE_DEFAULT for r in readings]
        ),
        "pressure_bar": floats([r["pressure_bar"] for r in readings]),
        "vibration": floats([r["vibration_rms"] for r in readings]),
        "load_pct": floats([float(r["load_pct"]) for r in readings]),
        "firmware_major": floats([r["machine"]["firmware"]["major"] for r in readings]),
        "mode": modes,
        "hours_since_service": floats([float(s.get("hours_since_service", 0.0)) for s in stored]),
    }


def condition(inputs: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The ground-truth class of each reading: wear from vibration, heat, hours and errors, plus noise."""
    wear = (
        inputs["vibration"].mean(axis=1) * 1.2
        + (inputs["temperature_c"][:, 0] - 60.0) / 15.0
        + inputs["hours_since_service"][:, 0] / 800.0
        + np.isin(inputs["last_error"][:, 0], ["E202", "E303"]) * 1.0
        + inputs["mode"][:, 2] * 0.5
        + rng.normal(0, 0.4, len(inputs["mode"]))
    )
    return np.where(wear > 3.2, "failure_imminent", np.where(wear > 2.2, "service_soon", "ok"))


@dataclass(frozen=True)
class TrainedModel:
    """An ONNX artifact on disk and its holdout accuracy."""

    version: str
    path: Path
    accuracy: float


def _frame(inputs: dict[str, np.ndarray]) -> Any:
    """The training DataFrame: one column per scalar input, vector inputs spread over numbered columns."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for name, values in inputs.items():
        if values.shape[1] == 1:
            columns[name] = values[:, 0]
        else:
            for i in range(values.shape[1]):
                columns[f"{name}_{i}"] = values[:, i]
    return pd.DataFrame(columns)


def train_versions(machines: Machines, out_dir: Path, rows: int = 6000) -> list[TrainedModel]:
    """v1: logistic regression; v2: a random forest; both behind the same ColumnTransformer."""
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    train_inputs = model_inputs(list(make_readings(machines, rows, seed=1)), machines)
    test_inputs = model_inputs(list(make_readings(machines, rows // 4, seed=2)), machines)
    train, test = _frame(train_inputs), _frame(test_inputs)
    labels, test_labels = condition(train_inputs, rng), condition(test_inputs, rng)
    numeric = [c for c in train.columns if c not in STRING_INPUTS]
    candidates = {
        "v1": LogisticRegression(max_iter=1000),
        "v2": RandomForestClassifier(n_estimators=40, max_depth=8, random_state=0),
    }
    trained = []
    for version, classifier in candidates.items():
        pipeline = Pipeline(
            [
                (
                    "columns",
                    ColumnTransformer(
                        [
                            ("categories", OneHotEncoder(handle_unknown="ignore"), list(STRING_INPUTS)),
                            ("numbers", StandardScaler(), numeric),
                        ]
                    ),
                ),
                ("classifier", classifier),
            ]
        )
        pipeline.fit(train, labels)
        accuracy = float((pipeline.predict(test) == test_labels).mean())
        path = out_dir / f"maintenance-{version}.onnx"
        path.write_bytes(to_onnx(pipeline, train).SerializeToString())
        log.info("trained %s: holdout accuracy %.3f -> %s", version, accuracy, path)
        trained.append(TrainedModel(version, path, accuracy))
    return trained


def to_onnx(pipeline: Any, frame: Any) -> Any:
    """skl2onnx conversion with one input per DataFrame column, then the numbered columns of each vector
    input (``vibration_0..3``, ``mode_0..3``) merged back into one [batch, k] input split inside the graph."""
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType

    initial = [
        (name, StringTensorType([None, 1]) if name in STRING_INPUTS else FloatTensorType([None, 1]))
        for name in frame.columns
    ]
    model = convert_sklearn(
        pipeline, initial_types=initial, options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for vector, width in (("vibration", VIBRATION_AXES), ("mode", len(MODE_VOCABULARY) + 1)):
        parts = [f"{vector}_{i}" for i in range(width)]
        kept = [i for i in graph.input if i.name not in parts]
        del graph.input[:]
        graph.input.extend(kept)
        graph.input.append(helper.make_tensor_value_info(vector, TensorProto.FLOAT, [None, width]))
        if opset >= 13:  # split sizes became an input in opset 13
            sizes = helper.make_tensor(f"{vector}_split", TensorProto.INT64, [width], [1] * width)
            graph.initializer.append(sizes)
            split = helper.make_node("Split", [vector, f"{vector}_split"], parts, axis=1)
        else:
            split = helper.make_node("Split", [vector], parts, axis=1, split=[1] * width)
        graph.node.insert(0, split)
    onnx.checker.check_model(model)
    return model
