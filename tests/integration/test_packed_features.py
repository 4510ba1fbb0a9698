"""The packed float32 feature layout end to end: vectors written by `load_packed_features`, read with MGET."""

from __future__ import annotations

import redis

from streamserve.config import FeatureSpec
from streamserve.demo.data import CARD_FIELDS, MERCHANT_FIELDS, Entities, make_events
from streamserve.demo.train import TrainedModel
from streamserve.ops.tools import load_packed_features
from tests.integration.harness import (
    Pipeline,
    WorkerThread,
    offline_features,
    offline_scores,
    predictions,
    produce_events,
)


def packed(spec: FeatureSpec, key: str, index: int) -> FeatureSpec:
    fields = {**spec.model_dump(), "key": key, "layout": "packed", "index": index}
    return FeatureSpec(**{**fields, "max_age_s": None, "updated_at_field": None})  # a vector has no time


def test_packed_vectors_score_exactly_like_the_hashes(
    pipeline: Pipeline, entities: Entities, models: dict[str, TrainedModel], redis_client: redis.Redis
) -> None:
    card_key, merchant_key = f"{pipeline.prefix}:vcard:{{card_id}}", f"{pipeline.prefix}:vmerchant:{{merchant_id}}"
    load_packed_features(
        redis_client, ({"card_id": c, **v} for c, v in entities.cards.items()), card_key, list(CARD_FIELDS)
    )
    load_packed_features(
        redis_client,
        ({"merchant_id": m, **v} for m, v in entities.merchants.items()),
        merchant_key,
        list(MERCHANT_FIELDS),
    )
    features = []
    for spec in pipeline.settings.features:
        if spec.source == "event":
            features.append(spec)
        elif spec.field in CARD_FIELDS:
            features.append(packed(spec, card_key, CARD_FIELDS.index(spec.field)))
        else:
            features.append(packed(spec, merchant_key, MERCHANT_FIELDS.index(spec.field)))
    assert [f.layout for f in features].count("packed") == 4
    worker = WorkerThread(pipeline.settings.model_copy(update={"features": features}))
    try:
        events = list(make_events(entities, 3000, seed=9))
        produce_events(pipeline, events)
        outputs = predictions(pipeline, len(events))
    finally:
        worker.stop()

    by_id = {record["event_id"]: record for _, record in outputs}
    assert set(by_id) == {e["event_id"] for e in events}, "one prediction per event, none dead-lettered"
    # The hashes hold the same values: offline features from them must give the same scores.
    expected_scores, expected_labels = offline_scores(
        models["v1"], offline_features(events, redis_client, pipeline.prefix)
    )
    got = [by_id[e["event_id"]]["score"] for e in events]
    assert max(abs(a - b) for a, b in zip(got, expected_scores.tolist(), strict=True)) < 1e-6
    assert [by_id[e["event_id"]]["label"] for e in events] == expected_labels.tolist()
