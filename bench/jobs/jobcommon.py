"""What every benchmark job shares: the command line, the demo's feature layout, the model, the output record.

The jobs run in three different virtualenvs (streamserve's, Quix Streams', faust's), so this module
imports nothing from streamserve or from the harness: fastavro, numpy, onnxruntime and the standard
library only. Keeping the feature rules in one place is what makes the jobs "the same job".
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import onnxruntime as ort

CARD_FIELDS = ("avg_amount_30d", "txn_count_24h", "chargeback_rate")
MERCHANT_FIELDS = ("risk_score",)
# Defaults when an entity has no value: the same as the streamserve pipeline config of the benchmark.
CARD_DEFAULTS = (50.0, 0.0, 0.0)
MERCHANT_DEFAULTS = (0.5,)
MODEL_NAME = "fraud"

# librdkafka producer settings of streamserve's output sink, so the confluent-kafka jobs pay the same
# per-record delivery guarantees (idempotent, acks=all, lz4) as the system they are compared with.
PRODUCER_SETTINGS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "partitioner": "murmur2_random",
    "queue.buffering.max.messages": 200_000,
}


def parse_args(description: str, commit: bool = False, layout: bool = False) -> argparse.Namespace:
    """The command line every job takes (--commit for the hand-written loop, --layout for the batch loop)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--input", required=True, help="input topic (Avro CardTransaction)")
    parser.add_argument("--output", required=True, help="output topic (Avro Prediction)")
    parser.add_argument("--group", required=True, help="consumer group id")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", default="", help="prefix of the Redis keys, e.g. 'bench-x:'")
    parser.add_argument("--model", type=Path, help="ONNX model (demo classifier, zipmap disabled)")
    parser.add_argument("--model-version", default="v1")
    parser.add_argument("--schemas", type=Path, help="directory with card_transaction.avsc and prediction.avsc")
    parser.add_argument("--batch-size", type=int, default=256, help="micro-batch size where the job batches")
    if commit:
        parser.add_argument("--commit", choices=["store", "each"], default="store")
    if layout:
        parser.add_argument(
            "--layout", choices=["hash", "packed"], default="hash", help="Redis features: hashes or float32 vectors"
        )
    return parser.parse_args()


def load_schema(path: Path) -> Any:
    """A parsed Avro schema."""
    return fastavro.parse_schema(json.loads(path.read_text()))


def onnx_session(path: Path) -> ort.InferenceSession:
    """An onnxruntime session with streamserve's serving options (one intra-op and one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def card_key(prefix: str, event: dict[str, Any]) -> str:
    """Redis hash of the event's card."""
    return f"{prefix}card:{event['card_id']}"


def merchant_key(prefix: str, event: dict[str, Any]) -> str:
    """Redis hash of the event's merchant."""
    return f"{prefix}merchant:{event['merchant_id']}"


def _value(raw: bytes | None, default: float) -> float:
    return default if raw is None else float(raw)


def feature_row(event: dict[str, Any], card: list[bytes | None], merchant: list[bytes | None]) -> list[float]:
    """Model inputs in the demo's order from an event and the HMGET replies of its card and merchant."""
    return [
        float(event["amount"]),
        float(event["hour_of_day"]),
        1.0 if event["is_online"] else 0.0,
        *(_value(raw, default) for raw, default in zip(card, CARD_DEFAULTS, strict=True)),
        *(_value(raw, default) for raw, default in zip(merchant, MERCHANT_DEFAULTS, strict=True)),
    ]


def score(session: ort.InferenceSession, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive-class probabilities and labels for a float32 matrix."""
    labels, probabilities = session.run(["label", "probabilities"], {session.get_inputs()[0].name: rows})
    return probabilities[:, 1], labels


def event_time_ms(event: dict[str, Any]) -> int:
    """The event time in epoch milliseconds (fastavro decodes timestamp-millis to datetime)."""
    value = event["event_time"]
    return value if isinstance(value, int) else int(value.timestamp() * 1000)


def prediction(
    event: dict[str, Any],
    probability: float,
    label: int,
    version: str,
    source: tuple[str, int, int],
) -> dict[str, Any]:
    """The output record (schemas/prediction.avsc) for one event."""
    return {
        "event_id": event["event_id"],
        "key": event["card_id"],
        "model_name": MODEL_NAME,
        "model_version": version,
        "score": float(probability),
        "label": int(label),
        "event_time": event_time_ms(event),
        "prediction_time": int(time.time() * 1000),
        "source_topic": source[0],
        "source_partition": source[1],
        "source_offset": source[2],
        "degraded": False,
    }


def ready(name: str) -> None:
    """Tell the harness (which reads the job's log) that the job is about to consume."""
    print(f"bench-job {name} ready pid={os.getpid()}", flush=True)
