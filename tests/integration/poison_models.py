"""Models for the poison-pill suite: a maintenance model that fails on an unseen category, and a tiny
regressor over one float input, built without streamserve's code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from streamserve.demo.maintenance import STRING_INPUTS, Machines, condition, make_readings, model_inputs, to_onnx


def _frame(inputs: dict[str, np.ndarray]) -> Any:
    """One DataFrame column per scalar input, vector inputs spread over numbered columns (as to_onnx expects)."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for name, values in inputs.items():
        if values.shape[1] == 1:
            columns[name] = values[:, 0]
        else:
            columns.update({f"{name}_{i}": values[:, i] for i in range(values.shape[1])})
    return pd.DataFrame(columns)


def train_strict_maintenance(machines: Machines, out_dir: Path, rows: int = 2000) -> Path:
    """The maintenance v1 model with OneHotEncoder(handle_unknown="error"): onnxruntime fails the whole
    batch when one row has a category it never saw (e.g. site "atlantis")."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    inputs = model_inputs(list(make_readings(machines, rows, seed=1)), machines)
    frame = _frame(inputs)
    numeric = [c for c in frame.columns if c not in STRING_INPUTS]
    pipeline = Pipeline(
        [
            (
                "columns",
                ColumnTransformer(
                    [
                        ("categories", OneHotEncoder(handle_unknown="error"), list(STRING_INPUTS)),
                        ("numbers", StandardScaler(), numeric),
                    ]
                ),
            ),
            ("classifier", LogisticRegression(max_iter=1000)),
        ]
    )
    pipeline.fit(frame, condition(inputs, np.random.default_rng(1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "maintenance-strict.onnx"
    path.write_bytes(to_onnx(pipeline, frame).SerializeToString())
    return path


def make_affine_model(path: Path, slope: float, intercept: float) -> Path:
    """score = slope * X + intercept, X a [batch, 1] float input: a regressor with a known formula."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["X", "slope"], ["scaled"]),
            helper.make_node("Add", ["scaled", "intercept"], ["score"]),
        ],
        "affine",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("slope", TensorProto.FLOAT, [], [slope]),
            helper.make_tensor("intercept", TensorProto.FLOAT, [], [intercept]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path
