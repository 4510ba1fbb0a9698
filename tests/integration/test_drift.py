"""Drift on the real broker and Redis, with the maintenance example (nested readings, string and one-hot and
vector inputs): `models publish --reference` profiles a sample, the worker verifies the profile with the model
and computes the PSI of each feature over windows of scored events; a shifted feature, and only it, drifts; a
tampered profile rejects its version like a bad model."""

from __future__ import annotations

import io
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamserve.cli import main
from streamserve.control.publish import publish
from streamserve.control.reference import write_profile
from streamserve.control.rollout import AcceptancePolicy
from streamserve.demo.maintenance import MODE_VOCABULARY, TEMPERATURE_DEFAULT, Machines, TrainedModel, make_readings
from streamserve.ops.tools import produce_avro
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.profile import PSI_FLOOR, ReferenceProfile
from streamserve.schemas import bundled
from tests.integration.harness import WorkerThread, read_topic, wait_until
from tests.integration.maintenance import MaintenancePipeline

WINDOW = 1000


def reference_file(readings: list[dict[str, Any]], machines: Machines, path: Path) -> Path:
    """The readings' model inputs as served, one column per feature (Parquet): built here from the raw values."""
    stored = [machines.redis.get(r["machine_id"], {}) for r in readings]
    table = pa.table(
        {
            "machine_model": [r["machine"]["model"] for r in readings],
            "site": [r["site"] if r["site"] is not None else "unknown" for r in readings],
            "last_error": [s.get("last_error", "none") for s in stored],
            "temperature_c": [
                r["temperature_c"] if r["temperature_c"] is not None else TEMPERATURE_DEFAULT for r in readings
            ],
            "pressure_bar": [r["pressure_bar"] for r in readings],
            "vibration": [r["vibration_rms"] for r in readings],
            "load_pct": [float(r["load_pct"]) for r in readings],
            "firmware_major": [float(r["machine"]["firmware"]["major"]) for r in readings],
            "mode": [r["mode"] for r in readings],  # its category: the profile maps it through the vocabulary
            "hours_since_service": [float(s.get("hours_since_service", 0.0)) for s in stored],
        }
    )
    pq.write_table(table, path)
    return path


def numpy_psi(edges: tuple[float, ...], expected: tuple[float, ...], values: np.ndarray, default: float) -> float:
    """PSI of values against a numeric profile entry, computed here: (edge[i-1], edge[i]] bins, default apart."""
    bins = np.where(values == default, len(edges) + 1, np.digitize(values, np.array(edges), right=True))
    actual = np.bincount(bins, minlength=len(expected)) / len(values)
    a, e = np.clip(actual, PSI_FLOOR, None), np.clip(np.array(expected), PSI_FLOOR, None)
    return float(np.sum((a - e) * np.log(a / e)))


def drift_records(bootstrap: str, topic: str, expected: int) -> list[dict[str, Any]]:
    schema = bundled("drift")
    found = []
    for message in read_topic(bootstrap, topic, expected, timeout_s=60, settle_s=0.5):
        record = fastavro.schemaless_reader(io.BytesIO(message.value() or b""), schema, None)
        assert isinstance(record, dict)
        found.append(record)
    return found


@pytest.fixture
def drifting(maintenance_factory: Callable[..., MaintenancePipeline]) -> MaintenancePipeline:
    overrides = {
        "monitor.drift_window": WINDOW,
        "monitor.drift_topic": "{name}-drift",
        "observe.port": 0,
        "observe.host": "127.0.0.1",
    }
    return maintenance_factory("drift", partitions=2, overrides=overrides)


def test_a_shifted_feature_drifts_alone_and_a_tampered_profile_is_rejected(
    drifting: MaintenancePipeline, machines: Machines, maintenance_models: dict[str, TrainedModel], tmp_path: Path
) -> None:
    s = drifting.settings
    schema = load_schema(s.input.schema_path)
    kafka: dict[str, str | int | float | bool] = {"bootstrap.servers": drifting.bootstrap}
    sample = reference_file(list(make_readings(machines, 3000, seed=41)), machines, tmp_path / "reference.parquet")
    v3 = tmp_path / "maintenance-v3.onnx"  # the v1 model under a version of its own, with its profile beside it
    v3.write_bytes(maintenance_models["v1"].path.read_bytes())
    worker = WorkerThread(s)
    try:
        code = main(["models", "publish", "-c", str(drifting.path), "--model", s.model.name, "--version", "v3",
                     "--uri", str(v3), "--reference", str(sample)])  # fmt: skip
        assert code == 0
        wait_until(lambda: worker.worker.registry.routing.live.version == "v3", 60, "the worker serving v3")
        profile = worker.worker.registry.routing.live.profile
        assert profile is not None
        assert profile == ReferenceProfile.from_bytes(Path(f"{v3}.profile.json").read_bytes())
        psi = worker.worker.metrics.psi

        def window(readings: list[dict[str, Any]]) -> dict[str, float]:
            psi.clear()
            produce_avro(kafka, s.input.topic, schema, readings, "machine_id")
            wait_until(lambda: ("maintenance", "v3", "score") in psi, 90, "a full drift window")
            return {feature: value for (_, _, feature), value in psi.items()}

        steady = window(list(make_readings(machines, WINDOW, seed=42)))
        assert len(steady) == len(profile.all())
        assert max(steady.values()) < 0.1, steady

        hot = list(make_readings(machines, WINDOW, seed=43))
        for reading in hot:
            if reading["temperature_c"] is not None:
                reading["temperature_c"] += 30.0
        heated = window(hot)
        features = {name: value for name, value in heated.items() if name != "score"}
        assert {name for name, value in features.items() if value > 0.25} == {"temperature_c"}, heated
        entry = next(e for e in profile.features if e.name == "temperature_c")
        served = np.array([r["temperature_c"] if r["temperature_c"] is not None else TEMPERATURE_DEFAULT for r in hot])
        assert heated["temperature_c"] == pytest.approx(
            numpy_psi(entry.edges, entry.expected, served, TEMPERATURE_DEFAULT), abs=1e-9
        )

        moved = list(make_readings(machines, WINDOW, seed=44))
        for i, reading in enumerate(moved):
            reading["site"] = "harbor" if i % 5 else reading["site"]
        relocated = window(moved)
        features = {name: value for name, value in relocated.items() if name != "score"}
        assert {name for name, value in features.items() if value > 0.25} == {"site"}, relocated

        records = drift_records(drifting.bootstrap, s.monitor.drift_topic, 2)
        by_feature = {r["feature"]: r for r in records}
        assert {"temperature_c", "site"} <= set(by_feature)
        assert set(by_feature) - {"temperature_c", "site"} <= {"score"}
        hot_record = by_feature["temperature_c"]
        assert (hot_record["model"], hot_record["version"], hot_record["window_events"]) == (
            "maintenance",
            "v3",
            WINDOW,
        )
        assert hot_record["psi"] == pytest.approx(heated["temperature_c"])
        assert hot_record["top_bins"][0]["bin"].endswith("inf]"), "the top bin of a heat wave is the hottest"
        assert by_feature["site"]["top_bins"][0]["bin"] == "harbor"
        server = worker.worker.observe_server
        assert server is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            scrape = response.read().decode()
        exported = re.search(r'streamserve_drift_psi\{[^}]*feature="site"[^}]*version="v3"[^}]*\} (\S+)', scrape)
        assert exported, "the PSI gauge as Prometheus scrapes it (the alert rule's streamserve_drift_psi)"
        assert float(exported.group(1)) == pytest.approx(relocated["site"])

        # v4: its profile changed after its digest was taken: rejected like a bad model, v3 keeps serving.
        v4 = tmp_path / "maintenance-v4.onnx"
        v4.write_bytes(maintenance_models["v2"].path.read_bytes())
        uri, digest, _ = write_profile(sample, s.model, s.features, "v4", str(v4))
        Path(f"{v4}.profile.json").write_bytes(
            Path(f"{v4}.profile.json").read_bytes().replace(b'"rows":3000', b'"rows":3001')
        )
        publish(kafka, s.control.topic, AcceptancePolicy(s.model.name), "v4", str(v4), profile=(uri, digest))
        follower = worker.worker.follower
        assert follower is not None
        wait_until(
            lambda: follower.last_rejection is not None and follower.last_rejection.version == "v4", 60, "v4 rejected"
        )
        rejection = follower.last_rejection
        assert rejection is not None
        assert "sha256 mismatch" in rejection.reason
        assert worker.worker.registry.routing.live.version == "v3"
    finally:
        worker.stop()
    mode = next(e for e in profile.features if e.name == "mode")
    assert mode.categories[: len(MODE_VOCABULARY)] == MODE_VOCABULARY  # profiled through the vocabulary
