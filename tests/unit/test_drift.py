"""Drift windows in the processor with no Kafka: a version with a profile reports the PSI of each feature per
window, and a drift record names a shifted feature, alone, with the bins that moved."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest

from streamserve.config import InputSettings, ModelSettings
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.drift import DriftTap
from streamserve.pipeline.encode import PredictionEncoder
from streamserve.pipeline.features import FeatureBuilder
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.process import BatchProcessor
from streamserve.pipeline.profile import build_profile
from streamserve.pipeline.routing import Routing
from streamserve.records import Source
from streamserve.schemas import bundled
from tests.unit.test_process import EVENT, FEATURES, SCHEMAS, avro, strict_model

WINDOW = 2000


class Gauges:
    def __init__(self) -> None:
        self.psi: dict[str, float] = {}

    def drift_psi(self, model: str, version: str, feature: str, value: float) -> None:
        self.psi[feature] = value


def tickets(rows: int, seed: int, wait_scale: float = 30.0, tech_share: float = 0.3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {"id": f"t{seed}-{i}", "queue": "tech" if rng.random() < tech_share else "billing",
         "wait_s": float(rng.gamma(2.0, wait_scale))}
        for i in range(rows)
    ]  # fmt: skip


@pytest.fixture
def setup(tmp_path: Path) -> tuple[BatchProcessor, Routing, Gauges]:
    schema_path = tmp_path / "ticket.avsc"
    schema_path.write_text(json.dumps(EVENT))
    settings = InputSettings(topic="t", schema=schema_path, key_field="queue", event_id_field="id")
    plain = OnnxModel.load(strict_model(), ModelSettings(name="tickets", uri="m.onnx"), "v5", FEATURES)
    reference = tickets(8000, seed=1)
    columns = {
        "queue": np.array([r["queue"] for r in reference], dtype=object),
        "wait_s": np.array([r["wait_s"] for r in reference]),
    }
    profile = build_profile("tickets", "v5", FEATURES, columns, plain.predict(columns).score)
    model = OnnxModel.load(
        strict_model(), ModelSettings(name="tickets", uri="m.onnx"), "v5", FEATURES, profile=(profile, "d" * 64)
    )
    gauges = Gauges()
    processor = BatchProcessor(
        LocalSchemaDecoder(load_schema(schema_path)),
        FeatureBuilder(FEATURES, None),
        PredictionEncoder(SCHEMAS / "prediction.avsc", settings),
        "out",
        "out.shadow",
        taps=[DriftTap("drift", WINDOW, 0.25, gauges)],
    )
    return processor, Routing(live=model), gauges


def run_window(setup: tuple[BatchProcessor, Routing, Gauges], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    processor, routing, _ = setup
    sources = [Source("in", 0, i, None, avro(r), None, 1000 + i) for i, r in enumerate(records)]
    drift = []
    for start in range(0, len(sources), 300):
        result = processor.run(sources[start : start + 300], routing)
        for topic, batch in result.side:
            assert topic == "drift"
            drift += [fastavro.schemaless_reader(io.BytesIO(r.value), bundled("drift"), None) for r in batch]
    return drift  # type: ignore[return-value]


def test_the_reference_distribution_does_not_drift(setup: tuple[BatchProcessor, Routing, Gauges]) -> None:
    assert run_window(setup, tickets(WINDOW, seed=2)) == []
    assert set(setup[2].psi) == {"queue", "wait_s", "score"}
    assert max(setup[2].psi.values()) < 0.1


def test_a_shifted_number_drifts_alone_with_its_top_bins(setup: tuple[BatchProcessor, Routing, Gauges]) -> None:
    records = run_window(setup, tickets(WINDOW, seed=3, wait_scale=90.0))
    assert {r["feature"] for r in records} - {"score"} == {"wait_s"}
    assert setup[2].psi["queue"] < 0.25
    wait = next(r for r in records if r["feature"] == "wait_s")
    assert wait["psi"] == setup[2].psi["wait_s"] > 0.25
    assert (wait["model"], wait["version"], wait["window_events"]) == ("tickets", "v5", WINDOW)
    top = wait["top_bins"][0]
    assert top["bin"].endswith("inf]")
    assert top["actual"] > top["expected"]
    assert sum(b["contribution"] for b in wait["top_bins"]) <= wait["psi"] + 1e-12


def test_a_shifted_category_drifts_alone(setup: tuple[BatchProcessor, Routing, Gauges]) -> None:
    records = run_window(setup, tickets(WINDOW, seed=4, tech_share=0.8))
    assert {r["feature"] for r in records} - {"score"} == {"queue"}
    assert records[0]["top_bins"][0]["bin"] in ("tech", "billing")
    assert setup[2].psi["wait_s"] < 0.25
