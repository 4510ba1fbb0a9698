"""Component limits, in this process, on the benchmark's events: Avro decode, Redis lookups, onnxruntime."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from typing import Any

import fastavro
import numpy as np
import onnxruntime as ort
import redis

from bench.dataset import SCHEMAS, Dataset
from streamserve.config import FeatureSpec, ModelSettings, RedisSettings
from streamserve.demo.data import CARD_FIELDS, MERCHANT_FIELDS, feature_row
from streamserve.pipeline.decode import LocalSchemaDecoder, load_schema
from streamserve.pipeline.features import FeatureBuilder, redis_fetcher
from streamserve.pipeline.infer import session_options
from streamserve.records import Event, Source

log = logging.getLogger(__name__)


def _measure(name: str, events: int, run: Callable[[], Any], note: str) -> dict[str, Any]:
    """Events/s and CPU seconds per 1k events of one call of `run` that handles `events` events."""
    run()  # warm caches, connections, lazy initialisation
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {
        "name": name,
        "events_per_s": round(events / wall, 1),
        "us_per_event": round(wall / events * 1e6, 3),
        "cpu_s_per_1k": round(cpu / events * 1000, 4),
        "note": note,
    }
    log.info("component %-34s %s", name, result)
    return result


def run_components(dataset: Dataset, batch_size: int = 256, sample: int = 20_000) -> list[dict[str, Any]]:
    """Each component alone on the first `sample` events of the benchmark."""
    payloads = [value for _, value in dataset.payloads[:sample]]
    schema = load_schema(SCHEMAS / "card_transaction.avsc")
    decode = LocalSchemaDecoder(schema)
    events = [decode(p) for p in payloads]
    results = []

    def fastavro_only() -> None:
        for p in payloads:
            fastavro.schemaless_reader(io.BytesIO(p), schema, None)

    def streamserve_decode() -> None:
        for p in payloads:
            decode(p)

    batches = [payloads[i : i + batch_size] for i in range(0, len(payloads), batch_size)]

    def streamserve_decode_batch() -> None:
        for batch in batches:
            decode.decode_many(batch)

    results.append(
        _measure(
            "Avro decode (fastavro)", len(payloads), fastavro_only, "schemaless_reader with a parsed schema, per event"
        )
    )
    results.append(
        _measure(
            "Avro decode (streamserve decode step)",
            len(payloads),
            streamserve_decode,
            "LocalSchemaDecoder: fastavro + checks, one call per record",
        )
    )
    results.append(
        _measure(
            "Avro decode (streamserve decode_many)",
            len(payloads),
            streamserve_decode_batch,
            f"LocalSchemaDecoder.decode_many: one fastavro read per batch of {batch_size} (what the worker runs)",
        )
    )

    client = redis.Redis.from_url(dataset.stack.redis_url)
    prefix = dataset.key_prefix
    few = events[: sample // 4]

    def round_trip_per_event() -> None:
        for e in few:
            pipe = client.pipeline(transaction=False)
            pipe.hmget(f"{prefix}card:{e['card_id']}", CARD_FIELDS)
            pipe.hmget(f"{prefix}merchant:{e['merchant_id']}", MERCHANT_FIELDS)
            pipe.execute()

    results.append(
        _measure(
            "Redis: one round trip per event",
            len(few),
            round_trip_per_event,
            "card + merchant HMGET pipelined, one round trip per event (the hand-written loop)",
        )
    )

    specs = [
        FeatureSpec(name="amount", source="event", field="amount"),
        FeatureSpec(name="hour_of_day", source="event", field="hour_of_day", dtype="int32"),
        FeatureSpec(name="is_online", source="event", field="is_online", dtype="bool"),
        *(
            FeatureSpec(name=f, source="redis", key=f"{prefix}card:{{card_id}}", field=f, default=0.0)
            for f in CARD_FIELDS
        ),
        FeatureSpec(
            name="merchant_risk",
            source="redis",
            key=f"{prefix}merchant:{{merchant_id}}",
            field="risk_score",
            default=0.5,
        ),
    ]
    fetch = redis_fetcher(client, RedisSettings(url=dataset.stack.redis_url))
    builder = FeatureBuilder(specs, fetch)
    wrapped = [Event(Source("t", 0, i, None, None, None, 0), e) for i, e in enumerate(events)]
    batches = [wrapped[i : i + batch_size] for i in range(0, len(wrapped), batch_size)]
    requests = []
    for batch in batches:
        cards = list(dict.fromkeys(f"{prefix}card:{e.fields['card_id']}" for e in batch))
        merchants = list(dict.fromkeys(f"{prefix}merchant:{e.fields['merchant_id']}" for e in batch))
        requests.append([(list(CARD_FIELDS), cards), (list(MERCHANT_FIELDS), merchants)])

    def pipelined_hmget() -> None:
        for request in requests:
            fetch(request)

    def feature_build() -> None:
        for batch in batches:
            builder.build(batch)

    results.append(
        _measure(
            f"Redis: pipelined HMGET, batch {batch_size}",
            len(events),
            pipelined_hmget,
            "one round trip per batch, one HMGET per distinct key (streamserve hash layout)",
        )
    )
    results.append(
        _measure(
            f"Enrich step (hash layout), batch {batch_size}",
            len(events),
            feature_build,
            "streamserve FeatureBuilder.build: keys, HMGET round trip, parse, matrix",
        )
    )
    results.extend(_packed_components(dataset, client, events, batch_size))
    client.close()

    matrix = np.array([feature_row(e, dataset.entities) for e in events], dtype=np.float32)
    session = ort.InferenceSession(
        str(dataset.models["v1"]),
        sess_options=session_options(ModelSettings(name="fraud", uri="-")),
        providers=["CPUExecutionProvider"],
    )
    name = session.get_inputs()[0].name
    chunks = [matrix[i : i + batch_size] for i in range(0, len(matrix), batch_size)]
    rows = matrix[: sample // 4]

    def ort_batches() -> None:
        for chunk in chunks:
            session.run(["label", "probabilities"], {name: chunk})

    def ort_rows() -> None:
        for i in range(len(rows)):
            session.run(["label", "probabilities"], {name: rows[i : i + 1]})

    results.append(
        _measure(
            f"onnxruntime, batch {batch_size}",
            len(matrix),
            ort_batches,
            "model v1 on pre-built float32 batches, 1 intra-op thread",
        )
    )
    results.append(_measure("onnxruntime, one row per call", len(rows), ort_rows, "model v1, one event per call"))
    return results


def _packed_components(
    dataset: Dataset, client: redis.Redis, events: list[dict[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """MGET of packed float32 vectors, when the run loaded them (see bench.dataset)."""
    packed_prefix = dataset.packed_prefix
    requests = []
    for i in range(0, len(events), batch_size):
        batch = events[i : i + batch_size]
        requests.append(
            (
                list(dict.fromkeys(f"{packed_prefix}card:{e['card_id']}" for e in batch)),
                list(dict.fromkeys(f"{packed_prefix}merchant:{e['merchant_id']}" for e in batch)),
            )
        )

    def mget() -> None:
        for cards, merchants in requests:
            pipe = client.pipeline(transaction=False)
            pipe.mget(cards)
            pipe.mget(merchants)
            pipe.execute()

    specs = [
        FeatureSpec(name="amount", source="event", field="amount"),
        FeatureSpec(name="hour_of_day", source="event", field="hour_of_day", dtype="int32"),
        FeatureSpec(name="is_online", source="event", field="is_online", dtype="bool"),
        *(
            FeatureSpec(
                name=f, source="redis", key=f"{packed_prefix}card:{{card_id}}", field=f, layout="packed", index=i
            )
            for i, f in enumerate(CARD_FIELDS)
        ),
        FeatureSpec(
            name="merchant_risk",
            source="redis",
            key=f"{packed_prefix}merchant:{{merchant_id}}",
            field="risk_score",
            layout="packed",
            index=0,
        ),
    ]
    builder = FeatureBuilder(specs, redis_fetcher(client, RedisSettings(url=dataset.stack.redis_url)))
    wrapped = [Event(Source("t", 0, i, None, None, None, 0), e) for i, e in enumerate(events)]
    batches = [wrapped[i : i + batch_size] for i in range(0, len(wrapped), batch_size)]

    def feature_build() -> None:
        for batch in batches:
            builder.build(batch)

    return [
        _measure(
            f"Redis: MGET packed float32, batch {batch_size}",
            len(events),
            mget,
            "one round trip per batch, one MGET per feature group (packed layout)",
        ),
        _measure(
            f"Enrich step (packed layout), batch {batch_size}",
            len(events),
            feature_build,
            "streamserve FeatureBuilder.build: keys, MGET round trip, unpack, matrix",
        ),
    ]
