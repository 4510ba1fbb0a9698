"""`streamserve demo --hybrid` (`make demo-hybrid`): batch, backtest and dead-letter replay beside the stream.

Every step scores with the one BatchProcessor the streaming worker runs (streamserve/scoring.py):

1. train v1 and v2; a pipeline of the fraud example with fresh topics and Redis keys of its own, where the
   merchant's risk score has no default (a merchant not in Redis yet cannot be scored: its events are dead letters);
2. load the card features and every merchant but a few onboarded late; a worker serving v1 scores a stream of
   events: predictions, and dead letters for the late merchants' events; their true outcomes go to the labels topic;
3. batch: the same events as a Parquet file, scored by `streamserve score`: its predictions equal the worker's for
   the same event ids, and the late merchants' rows are in the rejects file with the same reason;
4. backtest v2 on the stream's history before the swap: agreement, flips, score deltas and quality side by side;
5. swap to v2 (a signed announcement), load the late merchants, and replay the dead letters to the input topic:
   the worker, now serving v2, predicts them; a second replay replays nothing (the ledger);
6. a summary with the numbers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import yaml

from streamserve.batch.job import Summary, score_files
from streamserve.config import PipelineSettings, config_from, load_settings
from streamserve.control.signing import generate
from streamserve.demo.data import CARD_FIELDS, Entities, feature_row, fraud_label, make_entities, make_events
from streamserve.demo.run import PredictionReader, publish_validated, say
from streamserve.demo.train import train_versions
from streamserve.ops.admin import ensure_topics, pipeline_topics
from streamserve.ops.backtest import BacktestRequest, run_backtest
from streamserve.ops.comparison import render
from streamserve.ops.deadletters import Selection, summary
from streamserve.ops.history import parse_position
from streamserve.ops.preflight import env_overrides
from streamserve.ops.replay import ReplayRequest, run_replay
from streamserve.ops.tools import load_features, produce_avro
from streamserve.pipeline.decode import load_schema
from streamserve.schemas import bundled
from streamserve.wiring import build_worker

log = logging.getLogger(__name__)

LATE_MERCHANTS = 3
"""Merchants loaded into Redis only before the replay: their events are dead-lettered until then."""


@dataclass
class HybridOutcome:
    """What the hybrid demo did, with where it left its outputs (the test checks them on its own)."""

    config: Path
    directory: Path
    key_prefix: str
    events: list[dict[str, Any]]
    late_merchants: list[str]
    batch_input: Path
    batch_output: Path
    models: dict[str, Path] = field(default_factory=dict)
    batch: Summary | None = None
    backtest: dict[str, Any] = field(default_factory=dict)
    backtest_json: Path | None = None
    dead_letters: int = 0
    replayed: int = 0
    replayed_again: int = 0
    predicted_after_replay: int = 0
    batch_equal_to_worker: int = 0
    batch_compared: int = 0
    ok: bool = False


def hybrid_config(example: Path, directory: Path, run_id: str, models: dict[str, Path], trusted: str) -> Path:
    """The example pipeline with this run's topics, Redis keys and trusted key; merchant_risk without a default."""
    base = load_settings(example)
    prefix = f"hybrid-{run_id}:"
    overrides: dict[str, Any] = {
        "input.topic": f"{base.input.topic}-hybrid-{run_id}",
        "output.topic": f"{base.output.topic}-hybrid-{run_id}",
        "output.dead_letter_topic": f"{base.output.dead_letter_topic}-hybrid-{run_id}",
        "control.topic": f"{base.control.topic}-hybrid-{run_id}",
        "control.status_topic": f"{base.control.status_topic}-hybrid-{run_id}",
        "control.trusted_keys": [trusted],
        "control.artifact_cache_dir": str(directory / "artifacts"),
        "kafka.group_id": f"{base.kafka.group_id}-hybrid-{run_id}",
        "model.uri": str(models["v1"]),
        "model.version": "v1",
        "monitor.labels_topic": f"{base.input.topic}-hybrid-{run_id}.labels",
        "features.merchant_risk.default": None,  # a merchant not in Redis yet: its events are dead letters
        "log_every_s": 0,
    }
    for spec in base.features:
        if spec.source == "redis" and spec.key:
            overrides[f"features.{spec.name}.key"] = prefix + spec.key
    config = config_from(example, overrides)
    path = directory / f"hybrid-{run_id}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_entities(client: redis.Redis, entities: Entities, prefix: str, merchants: list[str]) -> None:
    """Cards (their hash and the streamed count's, as a snapshot) and the given merchants, under the prefix."""
    cards = [{"card_id": card_id, **values} for card_id, values in entities.cards.items()]
    load_features(
        client,
        ({k: row[k] for k in ("card_id", *CARD_FIELDS, "updated_at")} for row in cards),
        f"{prefix}card:{{card_id}}",
    )
    load_features(
        client,
        ({"card_id": r["card_id"], "txn_count_24h": r["txn_count_24h"]} for r in cards),
        f"{prefix}card_stream:{{card_id}}",
    )
    load_features(
        client, ({"merchant_id": m, **entities.merchants[m]} for m in merchants), f"{prefix}merchant:{{merchant_id}}"
    )


def produce_labels(settings: PipelineSettings, events: list[dict[str, Any]], entities: Entities) -> None:
    """Each event's true outcome (the demo's ground truth on its features) to the labels topic."""
    rows = np.array([feature_row(event, entities) for event in events], dtype=np.float64)
    truth = fraud_label(rows, np.random.default_rng(5))
    now = int(time.time() * 1000)
    labels = [
        {"event_id": e["event_id"], "label": int(y), "label_time": now} for e, y in zip(events, truth, strict=True)
    ]
    produce_avro(settings.kafka.producer_config(), settings.labels_topic, bundled("label"), labels, "event_id")


def compare_with_worker(output: Path, worker: list[dict[str, Any]]) -> tuple[int, int, float]:
    """(event ids whose batch score equals the worker's, event ids both scored, largest difference)."""
    streamed = {str(r["event_id"]): float(r["score"]) for r in worker if r["model_version"] == "v1"}
    table = pq.read_table(output, columns=["event_id", "score"])
    batch = dict(zip(table.column("event_id").to_pylist(), table.column("score").to_pylist(), strict=True))
    common = sorted(set(streamed) & set(batch))
    differences = [abs(batch[i] - streamed[i]) for i in common]
    return sum(d == 0.0 for d in differences), len(common), max(differences, default=0.0)


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    """Poll until the condition holds; TimeoutError naming what did not happen."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f}s")
        time.sleep(0.2)


def run_hybrid(example: Path, events: int, partitions: int, directory: Path | None = None) -> HybridOutcome:
    """The whole hybrid demo (see the module); the outcome says what it did and where its outputs are."""
    env_overrides()
    quiet = logging.getLogger("streamserve")
    if quiet.getEffectiveLevel() >= logging.INFO:  # the steps below say what happens; warnings still show,
        quiet.setLevel(logging.WARNING)
        logging.getLogger("streamserve.pipeline.write").setLevel(logging.ERROR)  # but not one per dead letter
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:6]
    base = load_settings(example)
    directory = directory or Path(base.model.uri).parent.parent / "data" / f"hybrid-{run_id}"
    directory.mkdir(parents=True, exist_ok=True)

    say(f"[1/6] training fraud models v1 and v2 into {directory / 'models'}")
    entities = make_entities()
    trained = {m.version: m for m in train_versions(entities, directory / "models")}
    sign_key = directory / "keys" / f"hybrid-{run_id}.pem"
    _, public_line = generate(sign_key)
    config = hybrid_config(example, directory, run_id, {v: m.path for v, m in trained.items()}, public_line)
    settings = load_settings(config)
    prefix = f"hybrid-{run_id}:"
    say(f"      pipeline {config} (topics and Redis keys of this run; merchant_risk has no default)")
    ensure_topics(settings.kafka.common(), pipeline_topics(settings, partitions))

    merchants = sorted(entities.merchants)
    late = merchants[:LATE_MERCHANTS]
    client = redis.Redis.from_url(settings.redis.url)
    load_entities(client, entities, prefix, merchants[LATE_MERCHANTS:])
    streamed = list(make_events(entities, events, seed=31))
    outcome = HybridOutcome(
        config, directory, prefix, streamed, late, directory / "events.parquet", directory / "predictions.parquet"
    )
    outcome.models = {version: model.path for version, model in trained.items()}
    say(f"[2/6] streaming {events:,} events to a worker serving v1 ({len(late)} merchants not in Redis yet:")
    say(f"      {', '.join(late)})")
    worker = build_worker(settings)
    thread = threading.Thread(target=worker.run, name="worker", daemon=True)
    thread.start()
    reader = PredictionReader(settings)
    try:
        _stream(settings, streamed, entities, late, reader, worker, outcome)
        _batch(settings, streamed, reader, outcome)
        _backtest(settings, trained["v2"].path, outcome)
        _swap_and_replay(settings, sign_key, trained["v2"].path, client, entities, worker, reader, outcome)
    finally:
        worker.stop()
        thread.join(timeout=60)
        reader.close()
    _summary(outcome, reader, time.monotonic() - started)
    return outcome


def _stream(
    settings: PipelineSettings,
    streamed: list[dict[str, Any]],
    entities: Entities,
    late: list[str],
    reader: PredictionReader,
    worker: Any,
    outcome: HybridOutcome,
) -> None:
    schema = load_schema(settings.input.schema_path)
    produce_avro(settings.kafka.producer_config(), settings.input.topic, schema, streamed, settings.input.key_field)
    produce_labels(settings, streamed, entities)
    stranded = sum(e["merchant_id"] in late for e in streamed)
    wait_for(
        lambda: reader.total >= len(streamed) - stranded and worker.stats.dead_letters >= stranded,
        180,
        f"{len(streamed) - stranded} predictions and {stranded} dead letters",
    )
    outcome.dead_letters = worker.stats.dead_letters
    say(
        f"      {reader.total:,} predictions by v1; {worker.stats.dead_letters:,} dead letters (their merchant's "
        f"risk score is missing) on {settings.output.dead_letter_topic}"
    )


def _batch(
    settings: PipelineSettings, streamed: list[dict[str, Any]], reader: PredictionReader, outcome: HybridOutcome
) -> None:
    say(f"[3/6] batch: the same {len(streamed):,} events as a Parquet file, scored by `streamserve score`")
    pq.write_table(pa.Table.from_pylist(streamed), outcome.batch_input)
    outcome.batch = score_files(settings, str(outcome.batch_input), outcome.batch_output)
    for line in outcome.batch.text().splitlines():
        say(f"      {line}")
    equal, compared, largest = compare_with_worker(outcome.batch_output, list(reader.records))
    outcome.batch_equal_to_worker, outcome.batch_compared = equal, compared
    say(
        f"      equal to the worker's score: {equal:,} of the {compared:,} events both scored "
        f"(largest difference {largest:g})"
    )


def _backtest(settings: PipelineSettings, candidate: Path, outcome: HybridOutcome) -> None:
    say("[4/6] backtest: v2 on the stream's history, before the swap (outside the consumer group)")
    request = BacktestRequest(
        parse_position("beginning"),
        parse_position("end"),
        "v2",
        str(candidate),
        parquet=outcome.directory / "backtest-v2.parquet",
    )
    outcome.backtest = run_backtest(settings, request)
    outcome.backtest_json = outcome.directory / "backtest-v2.json"
    outcome.backtest_json.write_text(json.dumps(outcome.backtest, indent=2) + "\n")
    for line in render(outcome.backtest).splitlines():
        say(f"      {line}")
    say(f"      report {outcome.backtest_json}, v2's predictions {request.parquet}")


def _swap_and_replay(
    settings: PipelineSettings,
    sign_key: Path,
    candidate: Path,
    client: redis.Redis,
    entities: Entities,
    worker: Any,
    reader: PredictionReader,
    outcome: HybridOutcome,
) -> None:
    say("[5/6] swap to v2 (signed announcement), load the late merchants, replay the dead letters")
    publish_validated(settings, sign_key, "v2", candidate, "hybrid demo: backtested")
    wait_for(lambda: worker.registry.routing.live.version == "v2", 60, "the swap to v2")
    load_features(
        client,
        ({"merchant_id": m, **entities.merchants[m]} for m in outcome.late_merchants),
        f"{outcome.key_prefix}merchant:{{merchant_id}}",
    )
    request = ReplayRequest(Selection(stage="features"))
    todo, done = run_replay(settings, request)
    outcome.replayed = done.replayed if done is not None else 0
    say(f"      {summary(todo, done)}")
    wanted = {e["event_id"] for e in outcome.events if e["merchant_id"] in outcome.late_merchants}

    def replayed_predicted() -> int:
        return sum(str(r["event_id"]) in wanted for r in list(reader.records) if r["model_version"] == "v2")

    wait_for(lambda: replayed_predicted() >= len(wanted), 120, f"v2's predictions of the {len(wanted)} replayed")
    outcome.predicted_after_replay = replayed_predicted()
    say(f"      the worker predicted {outcome.predicted_after_replay:,} replayed events with v2")
    todo, again = run_replay(settings, request)
    outcome.replayed_again = again.replayed if again is not None else 0
    say(f"      replayed again: {summary(todo, again)}")


def _summary(outcome: HybridOutcome, reader: PredictionReader, seconds: float) -> None:
    by_version = Counter(str(r["model_version"]) for r in list(reader.records))
    batch = outcome.batch
    agreement = outcome.backtest.get("agreement", {})
    say("[6/6] summary")
    say(
        f"      stream:    {len(outcome.events):,} events; predictions by version {dict(sorted(by_version.items()))}; "
        f"{outcome.dead_letters:,} dead letters"
    )
    if batch is not None:
        say(
            f"      batch:     {batch.rows:,} rows at {batch.rows_per_s:,.0f} rows/s, {batch.predictions:,} "
            f"predictions, {sum(batch.rejected.values()):,} rejected; {outcome.batch_equal_to_worker:,} of "
            f"{outcome.batch_compared:,} equal to the worker's score"
        )
    if agreement.get("rate") is not None:
        say(
            f"      backtest:  v2 agrees with v1 on {agreement['rate']:.2%} of {agreement['compared']:,} events "
            f"({agreement['flips']:,} flips); mean score delta {outcome.backtest['score_delta']['mean']:+.4f}"
        )
    say(
        f"      replay:    {outcome.replayed:,} dead letters replayed, {outcome.predicted_after_replay:,} then "
        f"predicted by v2; a second replay replayed {outcome.replayed_again}"
    )
    outcome.ok = (
        batch is not None
        and outcome.batch_compared > 0
        and outcome.batch_equal_to_worker == outcome.batch_compared
        and outcome.replayed == outcome.dead_letters
        and outcome.predicted_after_replay == outcome.replayed
        and outcome.replayed_again == 0
    )
    say(f"hybrid demo {'OK' if outcome.ok else 'FAILED'} in {seconds:.0f}s (outputs in {outcome.directory})")
