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
from typing import Any, cast

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


def make_machines(count: int = 300, seed: int = 5, prefix: str = "m") -> Machines:
    """Machines with a model each; most have maintenance features in Redis, some have none."""
    rng = np.random.default_rng(seed)
    models, stored = {}, {}
    for i in range(count):
        machine_id = f"{prefix}-{i:05d}"
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
    return np.where(wear > 3.8, "failure_imminent", np.where(wear > 2.8, "service_soon", "ok"))


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


def run_example(config: Path, readings: int, partitions: int) -> int:
    """The example end to end on the local stack: train, load Redis, stream, hot-swap v1 -> v2, summarise."""
    import threading
    from collections import Counter

    import redis

    from streamserve.config import load_settings
    from streamserve.demo.run import (
        PredictionReader,
        env_overrides,
        fresh_topics,
        publish_validated,
        say,
        trust_a_new_key,
    )
    from streamserve.ops.admin import ensure_topics, pipeline_topics
    from streamserve.ops.tools import load_features, produce_avro
    from streamserve.pipeline.decode import load_schema
    from streamserve.wiring import build_worker

    env_overrides()
    started = time.monotonic()
    base = load_settings(config)
    model_dir = Path(base.model.uri).parent
    say(f"[1/6] training maintenance models v1 (logistic regression) and v2 (random forest) into {model_dir}")
    machines = make_machines()
    trained = {m.version: m for m in train_versions(machines, model_dir)}
    for m in trained.values():
        say(f"      {m.version}: holdout accuracy {m.accuracy:.3f} over classes {list(CLASSES)}  ({m.path.name})")
    sign_key = trust_a_new_key(model_dir, fresh_topics(base))
    settings = load_settings(config)
    say(f"[2/6] creating topics on {settings.kafka.bootstrap_servers} ({partitions} partitions)")
    ensure_topics(settings.kafka.common(), pipeline_topics(settings, partitions))
    say(f"[3/6] loading maintenance features of {len(machines.redis)} machines into Redis at {settings.redis.url}")
    client = redis.Redis.from_url(settings.redis.url)
    load_features(client, ({"machine_id": m, **values} for m, values in machines.redis.items()), "machine:{machine_id}")

    say("[4/6] starting a worker; streaming the first half of the readings (v1) and 3 poison pills")
    worker = build_worker(settings)
    worker_thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    worker_thread.start()
    reader = PredictionReader(settings)
    schema = load_schema(settings.input.schema_path)
    first = readings // 2
    produce = settings.kafka.producer_config()
    produce_avro(produce, settings.input.topic, schema, make_readings(machines, first, seed=21), "machine_id")
    poison = list(make_readings(machines, 3, seed=99))
    poison[0]["temperature_c"] = float("nan")  # NaN in an event field: dead letter, never a default
    poison[1]["vibration_rms"] = [1.0, 2.0]  # an array of the wrong length
    poison[2]["pressure_bar"] = 1e39  # beyond float32
    produce_avro(produce, settings.input.topic, schema, poison, "machine_id")
    reader.wait_for(first, timeout_s=180)

    say("[5/6] announcing v2 on the control topic; streaming the second half (hot swap, no restart)")
    publish_validated(settings, sign_key, "v2", trained["v2"].path, "maintenance example hot swap")
    deadline = time.monotonic() + 60
    while worker.registry.routing.live.version != "v2" and time.monotonic() < deadline:
        time.sleep(0.1)
    produce_avro(
        produce, settings.input.topic, schema, make_readings(machines, readings - first, seed=22), "machine_id"
    )
    reader.wait_for(readings, timeout_s=180)
    worker.stop()
    worker_thread.join(timeout=60)
    reader.close()

    stats = worker.stats
    classes = Counter(str(record["predicted_class"]) for record in reader.records)
    say("[6/6] summary")
    say(f"      readings in:      {stats.events_in} ({readings} valid + 3 poison pills)")
    say(f"      predictions out:  {reader.total}  by version: {dict(sorted(reader.by_version.items()))}")
    say(f"      predicted class:  {dict(sorted(classes.items()))}")
    say(f"      dead letters:     {stats.dead_letters}  by stage: {stats.by_stage}")
    say(f"      feature defaults: {stats.missing_defaults} (null temperature or site, machines without Redis data)")
    say("      sample predictions:")
    for record in reader.samples[:4]:
        probabilities = cast("dict[str, float]", record["probabilities"] or {})
        shown = ", ".join(f"{k}={v:.2f}" for k, v in sorted(probabilities.items()))
        say(
            f"        {record['key']} ({record['machine_model']}, site {record['site']})  {record['model_version']}: "
            f"{record['predicted_class']}  p(failure_imminent)={record['score']:.3f}  [{shown}]"
        )
    ok = reader.by_version.get("v2", 0) > 0 and reader.total == readings and stats.dead_letters == 3
    say(f"maintenance example {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s")
    return 0 if ok else 1
