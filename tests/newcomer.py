"""A newcomer's own inputs, unlike the examples: a nested, nullable parcel-scan schema and a scikit-learn pipeline
(one-hot strings + scaled floats -> logistic regression, string labels) converted with skl2onnx.

One model input, ``sender_risk``, is no field of the events: ``streamserve init`` must leave it as a TODO.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "record",
    "name": "ParcelScan",
    "namespace": "com.example.logistics",
    "fields": [
        {"name": "scanId", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "parcel_id", "type": "string"},
        {"name": "scannedAt", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "depot",
            "type": {
                "type": "record",
                "name": "Depot",
                "fields": [
                    {
                        "name": "region",
                        "type": {"type": "enum", "name": "Region", "symbols": ["NORTH", "SOUTH", "EAST"]},
                    },
                    {"name": "load_factor", "type": ["null", "double"], "default": None},
                ],
            },
        },
        {
            "name": "parcel",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Parcel",
                    "fields": [
                        {"name": "weightKg", "type": "float"},
                        {"name": "service_level", "type": "string"},
                    ],
                },
            ],
            "default": None,
        },
        {"name": "distance_km", "type": "double"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ],
}

STRING_INPUTS = ("region", "service_level")
FLOAT_INPUTS = ("weight_kg", "load_factor", "distance_km", "sender_risk")
CLASSES = ("late", "on_time")


def write_inputs(directory: Path, seed: int = 7) -> tuple[Path, Path]:
    """The schema (.avsc) and the trained model (.onnx) in ``directory``."""
    import pandas as pd
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType, StringTensorType
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(seed)
    n = 600
    frame = pd.DataFrame(
        {
            "region": rng.choice(["NORTH", "SOUTH", "EAST"], n),
            "service_level": rng.choice(["service_level-0", "service_level-1", "service_level-2"], n),
            "weight_kg": rng.uniform(0, 100, n).astype(np.float32),
            "load_factor": rng.uniform(0, 100, n).astype(np.float32),
            "distance_km": rng.uniform(0, 100, n).astype(np.float32),
            "sender_risk": rng.uniform(0, 1, n).astype(np.float32),
        }
    )
    late = (
        frame["distance_km"] / 100 + frame["sender_risk"] + (frame["region"] == "EAST") + rng.normal(0, 0.3, n)
    ) > 1.2
    labels = np.where(late, "late", "on_time")
    model = Pipeline(
        [
            (
                "prepare",
                ColumnTransformer(
                    [
                        ("text", OneHotEncoder(handle_unknown="ignore"), list(STRING_INPUTS)),
                        ("numbers", StandardScaler(), list(FLOAT_INPUTS)),
                    ]
                ),
            ),
            ("classify", LogisticRegression(max_iter=500)),
        ]
    ).fit(frame, labels)
    types = [(name, StringTensorType([None, 1])) for name in STRING_INPUTS]
    types += [(name, FloatTensorType([None, 1])) for name in FLOAT_INPUTS]
    onx = to_onnx(model, initial_types=types, options={id(model): {"zipmap": False}}, target_opset=17)
    schema_path, model_path = directory / "parcel_scan.avsc", directory / "late-parcel.onnx"
    schema_path.write_text(json.dumps(SCHEMA, indent=2))
    model_path.write_bytes(onx.SerializeToString())
    return schema_path, model_path
