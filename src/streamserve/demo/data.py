"""Synthetic card transactions and entity features, deterministic for a seed."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

CARD_FIELDS = ("avg_amount_30d", "txn_count_24h", "chargeback_rate")
MERCHANT_FIELDS = ("risk_score",)
STREAMED_COUNT_WINDOW_MS = 86_400_000
STREAMED_COUNT_HOP_MS = 3_600_000
"""The card's transactions in the last 24 hours (hourly hops): ``stream_features`` of examples/fraud/pipeline.yaml."""


@dataclass(frozen=True)
class Entities:
    """Feature values of every card and merchant, as loaded into Redis."""

    cards: dict[str, dict[str, float]]
    merchants: dict[str, dict[str, float]]


def make_entities(n_cards: int = 2000, n_merchants: int = 200, seed: int = 7) -> Entities:
    """Cards and merchants with plausible feature distributions."""
    rng = np.random.default_rng(seed)
    now_ms = int(time.time() * 1000)
    cards = {
        f"card-{i:06d}": {
            "avg_amount_30d": round(float(rng.lognormal(3.5, 0.6)), 2),
            "txn_count_24h": float(rng.poisson(3)),
            "chargeback_rate": round(float(rng.beta(1, 60)), 4),
            "updated_at": float(now_ms),
        }
        for i in range(n_cards)
    }
    merchants = {f"merchant-{i:04d}": {"risk_score": round(float(rng.beta(2, 5)), 4)} for i in range(n_merchants)}
    return Entities(cards, merchants)


def make_events(
    entities: Entities, count: int, seed: int = 11, start_ms: int | None = None
) -> Iterator[dict[str, Any]]:
    """Card transactions for known cards and merchants (event_id unique per seed)."""
    rng = np.random.default_rng(seed)
    card_ids = list(entities.cards)
    merchant_ids = list(entities.merchants)
    start = int(time.time() * 1000) if start_ms is None else start_ms
    for i in range(count):
        card = card_ids[int(rng.integers(len(card_ids)))]
        typical = entities.cards[card]["avg_amount_30d"]
        amount = typical * float(rng.lognormal(0.0, 0.5)) * (8.0 if rng.random() < 0.03 else 1.0)
        yield {
            "event_id": f"e{seed}-{i:08d}",
            "card_id": card,
            "merchant_id": merchant_ids[int(rng.integers(len(merchant_ids)))],
            "amount": round(amount, 2),
            "hour_of_day": int(rng.integers(24)),
            "is_online": bool(rng.random() < 0.4),
            "event_time": start + i,
        }


def streamed_counts(
    events: Iterable[dict[str, Any]], window_ms: int = STREAMED_COUNT_WINDOW_MS, hop_ms: int = STREAMED_COUNT_HOP_MS
) -> list[float]:
    """Per event, its card's transactions in the window that holds the card's latest time so far and started
    first, this one included: what `streamserve features stream` keeps in Redis once it has seen the event.
    Computed here on its own (not with streamserve.streaming), so the training data checks the app."""
    seen: dict[str, list[int]] = {}
    counts = []
    for event in events:
        times = seen.setdefault(event["card_id"], [])
        times.append(int(event["event_time"]))
        latest = max(times)
        start = (latest - window_ms) // hop_ms * hop_ms + hop_ms
        counts.append(float(sum(start <= t < start + window_ms for t in times)))
    return counts


def feature_row(event: dict[str, Any], entities: Entities, txn_count: float | None = None) -> list[float]:
    """The model inputs of an event in the demo's feature order (see examples/fraud/pipeline.yaml); the card's
    transaction count is the streamed one when given (streamed_counts), else the batch-loaded hash field."""
    card = entities.cards[event["card_id"]]
    merchant = entities.merchants[event["merchant_id"]]
    return [
        float(event["amount"]),
        float(event["hour_of_day"]),
        float(event["is_online"]),
        card["avg_amount_30d"],
        card["txn_count_24h"] if txn_count is None else txn_count,
        card["chargeback_rate"],
        merchant["risk_score"],
    ]


def fraud_label(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ground truth for training: fraud is likelier for unusual amounts, night online buys, risky parties."""
    amount, hour, online, avg_amount, count, chargebacks, risk = rows.T
    night_online = online * (hour < 6)
    logit = (
        -4.0
        + 1.6 * np.log1p(amount / avg_amount) ** 2
        + 1.5 * night_online
        + 40 * chargebacks
        + 2.5 * risk
        + 0.1 * count
    )
    return (rng.random(len(rows)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
