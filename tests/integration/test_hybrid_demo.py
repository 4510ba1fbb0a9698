"""The hybrid demo (`make demo-hybrid`, demo/hybrid.py) end to end on the real broker and Redis.

Its outcomes are checked here on their own: the batch predictions equal offline onnxruntime on features rebuilt
from the events and the demo's entities; the dead letters are exactly the late merchants' events, and after the
replay each of them has exactly one prediction, by v2, on the output topic (every other event one, by v1); the
backtest's agreement equals the one recounted from both models' offline labels; the output is steps and a summary,
not log lines.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import redis

from streamserve.config import load_settings
from streamserve.demo.data import make_entities
from streamserve.demo.hybrid import run_hybrid
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import EXAMPLE_PIPELINE, entity_rows, read_topic
from tests.integration.servers import Servers

EVENTS = 3000


def offline(model: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, label) of onnxruntime on the rows, no streamserve code."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"X": rows.astype(np.float32)})
    return probabilities[:, 1], labels


def _forget(redis_url: str, prefix: str) -> None:
    """Delete the demo run's Redis keys (its entities under a prefix of its own)."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
    client.close()


def test_hybrid_demo_scores_backtests_and_replays_like_offline_onnxruntime(
    stack: Servers,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack.bootstrap_servers)
    monkeypatch.setenv("REDIS_URL", stack.redis_url)
    outcome = run_hybrid(EXAMPLE_PIPELINE, EVENTS, 2, directory=tmp_path / "hybrid")
    out = capsys.readouterr().out
    request.addfinalizer(lambda: _forget(stack.redis_url, outcome.key_prefix))
    assert outcome.ok, out
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    assert "hybrid demo OK" in out
    assert not [line for line in out.splitlines() if line.lstrip().startswith("{")], "JSON log lines in the output"

    entities = make_entities()  # the demo's entities: the same for the same seed
    events = outcome.events
    late = set(outcome.late_merchants)
    stranded = {e["event_id"] for e in events if e["merchant_id"] in late}
    assert stranded, "the demo's late merchants had no events"

    scored = [e for e in events if e["event_id"] not in stranded]
    v1_scores, v1_labels = offline(outcome.models["v1"], entity_rows(scored, entities))
    v2_scores, v2_labels = offline(outcome.models["v2"], entity_rows(scored, entities))

    # Batch: every scored row as offline onnxruntime scores it; the late merchants' rows rejected, with the reason.
    batch = {r["event_id"]: r["score"] for r in pq.read_table(outcome.batch_output).to_pylist()}
    assert batch.keys() == {e["event_id"] for e in scored}
    np.testing.assert_allclose([batch[e["event_id"]] for e in scored], v1_scores, rtol=0, atol=1e-6)
    rejects = pq.read_table(outcome.batch_output.with_name("predictions.rejects.parquet")).to_pylist()
    assert {json.loads(r["row"])["event_id"] for r in rejects} == stranded
    assert all(r["stage"] == "features" and "merchant_risk" in r["reason"] for r in rejects)

    # Stream and replay: the dead letters are the late merchants' events; after the replay every event has exactly
    # one prediction, the replayed ones by v2 (on the merchants loaded since), the others by v1.
    settings = load_settings(outcome.config)
    input_schema = load_schema(settings.input.schema_path)
    dead = read_topic(stack.bootstrap_servers, settings.output.dead_letter_topic, len(stranded))
    originals = LocalSchemaDecoder(input_schema).decode_many([m.value() for m in dead])
    assert sorted(str(r["event_id"]) for r in originals) == sorted(stranded)  # type: ignore[index]
    schema = load_schema(settings.output.schema_path)
    written = read_topic(stack.bootstrap_servers, settings.output.topic, EVENTS, isolation="read_committed")
    predictions = [decode_prediction(schema, m.value()) for m in written]
    assert Counter(str(p["event_id"]) for p in predictions) == Counter(e["event_id"] for e in events)
    versions = {str(p["event_id"]): p["model_version"] for p in predictions}
    assert {versions[i] for i in stranded} == {"v2"}
    assert {versions[e["event_id"]] for e in scored} == {"v1"}
    replayed = [e for e in events if e["event_id"] in stranded]
    replayed_scores, _ = offline(outcome.models["v2"], entity_rows(replayed, entities))
    by_id = {str(p["event_id"]): p["score"] for p in predictions}
    np.testing.assert_allclose([by_id[e["event_id"]] for e in replayed], replayed_scores, rtol=0, atol=1e-6)
    assert outcome.replayed == len(stranded)
    assert outcome.replayed_again == 0

    # Backtest before the swap: the agreement recounted from both models' offline labels on the events both scored.
    agreement = outcome.backtest["agreement"]
    assert agreement["compared"] == len(scored)
    assert agreement["agree"] == int((v1_labels == v2_labels).sum())
    assert outcome.backtest["compared"] == len(scored)
    assert sum(outcome.backtest["rejected"].values()) == len(stranded)
    delta = outcome.backtest["score_delta"]["mean"]
    assert delta == pytest.approx(float((v2_scores - v1_scores).mean()), abs=1e-6)
