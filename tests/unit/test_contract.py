"""The score's meaning is part of the contract: real ONNX classifiers whose class set or order differ."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from streamserve.control.contract import check_score_contract, score_contract_problem
from streamserve.errors import ScoreContractChanged
from streamserve.pipeline.infer import OnnxModel
from tests.unit.test_infer import FEATURES, classifier, settings

V1_CLASSES = ["high", "low", "medium"]


def load(labels: list[str] | list[int], version: str, **overrides: Any) -> OnnxModel:
    return OnnxModel.load(classifier(labels), settings(**overrides), version, FEATURES)


@pytest.mark.parametrize(
    "v2_classes", [["medium", "high", "low"], ["critical", "high", "low", "medium"], ["high", "low"]]
)
def test_an_integer_score_column_refuses_another_class_order_or_set(v2_classes: list[str]) -> None:
    v1, v2 = load(V1_CLASSES, "v1", score_column=0), load(v2_classes, "v2", score_column=0)
    problem = score_contract_problem(settings(score_column=0), v1, v2)
    assert problem is not None
    assert "score_column 0 would score" in problem
    assert "score_column: high" in problem, "it says to name the class the live version scores"
    with pytest.raises(ScoreContractChanged, match="name the class"):
        check_score_contract(settings(score_column=0), v1, v2)


def test_a_named_score_column_follows_its_class_through_a_new_order() -> None:
    v1, v2 = load(V1_CLASSES, "v1", score_column="high"), load(["medium", "high", "low"], "v2", score_column="high")
    assert score_contract_problem(settings(score_column="high"), v1, v2) is None
    columns = {
        "a": np.array([0.2, 0.9]),
        "b": np.array([0.4, 0.1]),
        "plan": np.array(["basic", "pro"], dtype=object),
    }
    served = v2.predict(columns).score
    # Offline onnxruntime on the same rows: P(high) is column 1 of v2's probabilities (classes medium, high, low).
    session = ort.InferenceSession(classifier(["medium", "high", "low"]), providers=["CPUExecutionProvider"])
    feeds = {
        "x": np.stack([columns["a"], columns["b"]], axis=1).astype(np.float32),
        "plan": columns["plan"].reshape(-1, 1),
    }
    offline = session.run(["probabilities"], feeds)[0]
    np.testing.assert_allclose(served, offline[:, 1], rtol=1e-6)
    assert not np.allclose(served, offline[:, 0]), "the classes' columns differ, so the test can tell them apart"


def test_the_same_classes_in_the_same_order_keep_the_contract() -> None:
    v1, v2 = load(V1_CLASSES, "v1", score_column=2), load(V1_CLASSES, "v2", score_column=2)
    assert score_contract_problem(settings(score_column=2), v1, v2) is None
    check_score_contract(settings(score_column=2), v1, v1)


def test_the_label_type_is_part_of_the_contract() -> None:
    v1, v2 = load([0, 1, 2], "v1", score_column=1), load(V1_CLASSES, "v2", score_column=1)
    problem = score_contract_problem(settings(score_column=1), v1, v2)
    assert problem is not None
    assert "labels are strings where v1's are ints" in problem


def test_the_probabilities_map_keeps_its_keys() -> None:
    named = {"score_column": "high", "probabilities": True}
    v1 = load(V1_CLASSES, "v1", **named)
    reordered = load(["medium", "high", "low"], "v2", **named)
    extended = load(["critical", "high", "low", "medium"], "v3", **named)
    assert score_contract_problem(settings(**named), v1, reordered) is None, "a map's keys have no order"
    problem = score_contract_problem(settings(**named), v1, extended)
    assert problem is not None
    assert "probabilities map would change its keys" in problem
