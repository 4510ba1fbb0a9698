"""Model signatures as exported: several typed inputs bound by name, outputs read by name, clear mismatches."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.errors import SignatureMismatch
from streamserve.pipeline.infer import OnnxModel


def classifier(labels: list[str] | list[int], extra: bool = False) -> bytes:
    """x: float [N, 2], plan: string [N, 1] -> LinearClassifier over x, `plan` length-encoded into the score.

    probabilities: float [N, C]; label: string or int64 [N]; optionally `anomaly`: float [N, 1] (sum of x).
    """
    n_classes = len(labels)
    text = isinstance(labels[0], str)
    coefficients = [float(c * 2 + i) / 10 for c in range(n_classes) for i in range(2)]
    plan_codes = helper.make_node(
        "LabelEncoder",
        ["plan"],
        ["plan_code"],
        domain="ai.onnx.ml",
        keys_strings=["basic", "pro"],
        values_floats=[0.0, 1.0],
        default_float=-1.0,
    )
    nodes = [
        plan_codes,
        helper.make_node("Concat", ["x", "plan_code"], ["features"], axis=1),
        helper.make_node(
            "LinearClassifier",
            ["features"],
            ["label", "raw"],
            domain="ai.onnx.ml",
            coefficients=[v for c in range(n_classes) for v in (*coefficients[c * 2 : c * 2 + 2], 0.5 * c)],
            intercepts=[0.1 * c for c in range(n_classes)],
            **({"classlabels_strings": labels} if text else {"classlabels_ints": labels}),
            post_transform="SOFTMAX",
        ),
        helper.make_node("Identity", ["raw"], ["probabilities"]),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.STRING if text else TensorProto.INT64, [None]),
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, n_classes]),
    ]
    if extra:
        nodes.append(helper.make_node("Constant", [], ["axes"], value_ints=[1]))
        nodes.append(helper.make_node("ReduceSum", ["x", "axes"], ["anomaly"], keepdims=1))
        outputs.append(helper.make_tensor_value_info("anomaly", TensorProto.FLOAT, [None, 1]))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("plan", TensorProto.STRING, [None, 1]),
        ],
        outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    return model.SerializeToString()


FEATURES = [
    FeatureSpec(name="a", source="event", field="a", input="x"),
    FeatureSpec(name="b", source="event", field="b", dtype="float64", input="x"),
    FeatureSpec(name="plan", source="event", field="plan", dtype="string", input="plan"),
]


def settings(**overrides: Any) -> ModelSettings:
    return ModelSettings(name="m", uri="m.onnx", **{"label_output": "label", **overrides})


def columns(n: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    plans = np.array([["basic", "pro", "free"][i % 3] for i in range(n)], dtype=object)
    return {"a": rng.random(n), "b": rng.random(n) * 10, "plan": plans}


def offline(model_bytes: bytes, cols: dict[str, np.ndarray], names: list[str]) -> list[Any]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {
        "x": np.column_stack([cols["a"], cols["b"]]).astype(np.float32),
        "plan": cols["plan"].reshape(-1, 1),
    }
    return session.run(names, feeds)


def test_string_labels_class_chosen_by_label_whole_vector_and_extra_outputs() -> None:
    data = classifier(["ok", "service", "failure"], extra=True)
    model = OnnxModel.load(
        data,
        settings(score_column="failure", probabilities=True, extra_outputs=["anomaly"]),
        "v1",
        FEATURES,
    )
    assert model.classes == ("ok", "service", "failure")
    cols = columns()
    outputs = model.predict(cols)
    labels, probabilities, anomaly = offline(data, cols, ["label", "probabilities", "anomaly"])
    assert outputs.label is None
    assert outputs.label_text is not None
    assert outputs.label_text.tolist() == labels.tolist()
    np.testing.assert_array_equal(outputs.score, probabilities[:, 2].astype(np.float64))
    assert outputs.probabilities is not None
    np.testing.assert_array_equal(outputs.probabilities, probabilities.astype(np.float64))
    np.testing.assert_array_equal(outputs.extra["anomaly"], anomaly[:, 0].astype(np.float64))


def test_int_labels_and_column_by_index() -> None:
    data = classifier([3, 7])
    model = OnnxModel.load(data, settings(score_column=1), "v1", FEATURES)
    cols = columns(9)
    outputs = model.predict(cols)
    labels, probabilities = offline(data, cols, ["label", "probabilities"])
    assert outputs.label is not None
    assert outputs.label.tolist() == labels.tolist()
    assert model.classes == ("3", "7")
    np.testing.assert_array_equal(outputs.score, probabilities[:, 1].astype(np.float64))


@pytest.mark.parametrize(
    ("features", "model_settings", "message"),
    [
        (FEATURES[:2], {}, "input 'plan'"),
        ([*FEATURES, FeatureSpec(name="c", source="event", field="c", input="x")], {}, "input 'x' takes 2 columns"),
        ([FEATURES[0], FEATURES[1], FEATURES[2].model_copy(update={"input": "x"})], {}, r"string features \['plan'\]"),
        ([FEATURES[0], FEATURES[1].model_copy(update={"input": "nope"}), FEATURES[2]], {}, "feeds input 'nope'"),
        ([FEATURES[0].model_copy(update={"input": None}), *FEATURES[1:]], {}, "feature 'a' names no model input"),
        (FEATURES, {"score_column": "unknown-class"}, "not a class of the model"),
        (FEATURES, {"label_output": "labels"}, "has no output 'labels'"),
        (FEATURES, {"score_column": 5}, "outside output"),
    ],
)
def test_signature_mismatches_name_what_does_not_fit(
    features: list[FeatureSpec], model_settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(SignatureMismatch, match=message):
        OnnxModel.load(classifier(["ok", "failure"]), settings(**model_settings), "v1", features)


def test_rows_that_do_not_fit_a_float_input_are_found() -> None:
    model = OnnxModel.load(classifier(["ok", "failure"]), settings(), "v1", FEATURES)
    cols = columns(4)
    cols["b"][2] = 1e300  # fine as float64, infinite as float32
    assert model.unfit_rows(cols).tolist() == [False, False, True, False]
