"""`streamserve init` and `streamserve check` as a newcomer runs them (issue 27, items 1 and 2): init maps the
model's inputs to the event fields of their names and leaves the one it cannot map as a TODO; check passes
once that TODO is filled, and catches offline, with exit 1 and one line, each mistake a config can make."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper

from streamserve.cli import main
from streamserve.ops.scaffold import match_field, propose
from streamserve.ops.synthetic import EventMaker
from streamserve.pipeline.fields import FieldType
from tests.newcomer import CLASSES, write_inputs

SENDER_RISK = {
    "name": "sender_risk",
    "source": "redis",
    "key": "sender:{parcel_id}",
    "field": "sender_risk",
    "default": 0.5,
    "input": "sender_risk",
}


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The newcomer's schema and model (tests/newcomer.py), trained once for the module."""
    return write_inputs(tmp_path_factory.mktemp("newcomer"))


@pytest.fixture
def initialised(newcomer: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """`streamserve init` run on the newcomer's inputs: the config written and what init printed."""
    schema, model = newcomer
    out = tmp_path / "pipeline.yaml"
    assert main(["init", "--schema", str(schema), "--model", str(model), "--out", str(out)]) == 0
    return out, capsys.readouterr().out


def edit(path: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """The config at path, changed, written beside it."""
    config = yaml.safe_load(path.read_text())
    change(config)
    changed = path.with_name(f"changed-{len(list(path.parent.iterdir()))}.yaml")
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    return changed


def fill_todo(config: dict[str, Any]) -> None:
    """What the summary asks for: the one input without a field, fed from Redis."""
    config["features"].append(dict(SENDER_RISK))


def run_check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check", "-c", str(path)])
    captured = capsys.readouterr()
    return code, (captured.out + captured.err).splitlines()


def test_init_maps_inputs_by_name_and_names_the_todo(initialised: tuple[Path, str]) -> None:
    out, printed = initialised
    config = yaml.safe_load(out.read_text())
    fields = {f["name"]: (f["field"], f.get("dtype", "float32")) for f in config["features"]}
    assert fields == {
        "region": ("depot.region", "string"),  # an enum feeding a string input
        "service_level": ("parcel.service_level", "string"),
        "weight_kg": ("parcel.weightKg", "float32"),  # snake/camel
        "load_factor": ("depot.load_factor", "float32"),
        "distance_km": ("distance_km", "float32"),
    }
    assert all(f["input"] == f["name"] for f in config["features"]), "a multi-input model: each feature names its input"
    assert config["input"] | {"topic": None, "schema": None} == {
        "topic": None,
        "schema": None,
        "event_id_field": "scanId",
        "key_field": "parcel_id",
        "event_time_field": "scannedAt",
    }
    assert (config["model"]["score_output"], config["model"]["label_output"]) == ("probabilities", "label")
    assert config["model"]["score_column"] in CLASSES
    assert (out.parent / config["output"]["schema"]).is_file()
    text = out.read_text()
    assert "# TODO: model input 'sender_risk' (tensor(float) [None, 1]) matches no event field" in text
    assert "source: redis" in text.split("TODO", 1)[1].split("model:")[0]
    assert "snake/camel name (last part of the path): event field parcel.weightKg" in printed
    assert "1 TODO(s)" in printed
    assert "sender_risk" in printed.split("TODO(s)")[1]


def test_init_refuses_to_overwrite(initialised: tuple[Path, str], newcomer: tuple[Path, Path]) -> None:
    out, _ = initialised
    schema, model = newcomer
    assert main(["init", "--schema", str(schema), "--model", str(model), "--out", str(out)]) == 2


def test_check_passes_once_the_todo_is_filled_and_its_sample_equals_onnxruntime(
    initialised: tuple[Path, str], newcomer: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = initialised
    code, lines = run_check(edit(out, fill_todo), capsys)
    assert code == 0, lines
    ok = next(line for line in lines if line.startswith("ok: "))
    sample = json.loads(next(line for line in lines if line.startswith("sample prediction: ")).split(": ", 1)[1])
    # The events check made, made again here; the sample's features rebuilt from its event, scored offline.
    schema_path, model_path = newcomer
    events = list(EventMaker(json.loads(schema_path.read_text()), seed=0, unique=["scanId"]).events(100))
    usable = [e for e in events if e["parcel"] is not None and e["depot"]["load_factor"] is not None]
    assert ok.startswith(f"ok: {len(usable)} of 100 synthetic events scored"), ok
    event = next(e for e in events if e["scanId"] == sample["event_id"])
    feeds = {
        "region": np.array([[event["depot"]["region"]]], dtype=object),
        "service_level": np.array([[event["parcel"]["service_level"]]], dtype=object),
        "weight_kg": np.array([[event["parcel"]["weightKg"]]], dtype=np.float32),
        "load_factor": np.array([[event["depot"]["load_factor"]]], dtype=np.float32),
        "distance_km": np.array([[event["distance_km"]]], dtype=np.float32),
        "sender_risk": np.array([[0.5]], dtype=np.float32),  # the stand-in reply: the feature's default
    }
    label, probabilities = ort.InferenceSession(str(model_path)).run(["label", "probabilities"], feeds)
    column = list(CLASSES).index(yaml.safe_load(out.read_text())["model"]["score_column"])
    assert sample["predicted_class"] == label[0]
    assert sample["score"] == pytest.approx(float(probabilities[0, column]), abs=1e-6)
    assert sample["key"] == event["parcel_id"]


@pytest.mark.parametrize(
    ("mistake", "change", "expected"),
    [
        (
            "a feature field missing from the schema",
            lambda c: c["features"][4].update(field="distanceKm"),
            "feature 'distance_km': field 'distanceKm' is not in the event schema (the event has no field"
            " 'distanceKm'); fields that fit a dtype float32 feature: scannedAt, depot.load_factor, parcel.weightKg,"
            " distance_km",
        ),
        (
            "a dtype that does not fit the model input",
            lambda c: c["features"][2].update(field="parcel.service_level", dtype="string"),
            "input 'weight_kg' is tensor(float); string features ['weight_kg'] need a string input or a vocabulary",
        ),
        (
            "a model input with no feature",
            lambda c: c["features"].pop(4),
            "model input 'distance_km' (tensor(float) [None, 1]) is fed by no feature: add one with"
            " `input: distance_km`",
        ),
        (
            "a copied field the output schema does not have",
            lambda c: c["output"].update(copy_fields={"region": "depot.region"}),
            "output.copy_fields ['region']: the output schema",
        ),
        (
            "a label output that does not exist",
            lambda c: c["model"].update(label_output="output_label"),
            "has no output 'output_label'; it has ['label', 'probabilities']",
        ),
    ],
)
def test_check_catches_offline(
    mistake: str,
    change: Callable[[dict[str, Any]], None],
    expected: str,
    initialised: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, _ = initialised
    config = edit(out, fill_todo)
    code, lines = run_check(edit(config, change), capsys)
    assert code == 1, f"{mistake}: {lines}"
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 1, lines
    assert expected in problems[0], f"{mistake}: {problems[0]}"


def test_check_catches_a_vector_length_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A vector feature of 2 numbers for a model input of 3 columns."""
    schema = {
        "type": "record",
        "name": "Reading",
        "fields": [
            {"name": "reading_id", "type": "string"},
            {"name": "sensor_id", "type": "string"},
            {"name": "samples", "type": {"type": "array", "items": "double"}},
        ],
    }
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["samples", "axes"], ["variable"], keepdims=1)],
        "sum",
        [helper.make_tensor_value_info("samples", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("variable", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "reading.avsc").write_text(json.dumps(schema))
    onnx.save(model, tmp_path / "sum.onnx")
    out = tmp_path / "pipeline.yaml"
    assert (
        main(
            [
                "init",
                "--schema",
                str(tmp_path / "reading.avsc"),
                "--model",
                str(tmp_path / "sum.onnx"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    config = yaml.safe_load(out.read_text())
    assert config["features"] == [{"name": "samples", "source": "event", "field": "samples", "length": 3}]
    assert config["model"]["label_output"] is None, "a regressor: no label"
    capsys.readouterr()
    code, lines = run_check(out, capsys)
    assert code == 0, lines
    code, lines = run_check(edit(out, lambda c: c["features"][0].update(length=2)), capsys)
    assert code == 1
    assert lines[0] == "problem: input 'samples' takes 3 columns; features ['samples'] give 2"


def test_names_match_exact_then_case_insensitive_then_snake_camel() -> None:
    fields = [
        ("Amount", FieldType("float")),
        ("device.osName", FieldType("string")),
        ("device.os_version", FieldType("string")),
    ]
    assert match_field("amount", fields) == (["Amount"], "case-insensitive name")
    assert match_field("device_os_name", fields) == (["device.osName"], "snake/camel name")
    assert match_field("osName", fields) == (["device.osName"], "exact name (last part of the path)")
    assert match_field("os_version", fields) == (["device.os_version"], "exact name (last part of the path)")
    assert match_field("merchant", fields) == ([], "")


def test_a_zipmap_classifier_is_a_todo_saying_how_to_convert_it(tmp_path: Path) -> None:
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(0).normal(size=(50, 1)).astype(np.float32)
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    (tmp_path / "m.onnx").write_bytes(to_onnx(model, x[:1]).SerializeToString())  # ZipMap on by default
    schema = {"type": "record", "name": "E", "fields": [{"name": "event_id", "type": "string"}]}
    (tmp_path / "e.avsc").write_text(json.dumps(schema))
    scaffold = propose(tmp_path / "e.avsc", tmp_path / "m.onnx", tmp_path / "p.yaml")
    zipmap = [todo for todo in scaffold.todos if "ZipMap" in todo]
    assert len(zipmap) == 1
    assert "'zipmap': False" in zipmap[0]
    assert any("model input 'X'" in todo for todo in scaffold.todos), "no field named like the input X"
