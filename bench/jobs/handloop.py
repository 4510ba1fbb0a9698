"""The hand-written loop: what a user writes without a framework, one event at a time.

Per event: poll, decode (fastavro), one Redis call (HMGET of the card and the merchant, pipelined
into a single round trip), onnxruntime on one row, encode + produce, commit. The commit is either
librdkafka's recommended at-least-once pattern, ``store_offsets`` per event with the background
auto-commit (``--commit store``, the default), or ``commit(asynchronous=True)`` per event
(``--commit each``: one OffsetCommit request per event).
"""

from __future__ import annotations

import io
import signal
from types import FrameType

import fastavro
import numpy as np
import redis
from confluent_kafka import Consumer, Producer
from jobcommon import (
    CARD_FIELDS,
    MERCHANT_FIELDS,
    PRODUCER_SETTINGS,
    card_key,
    feature_row,
    load_schema,
    merchant_key,
    onnx_session,
    parse_args,
    prediction,
    ready,
    score,
)


def main() -> None:
    args = parse_args(__doc__ or "", commit=True)
    store_offsets = args.commit == "store"
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    event_schema = load_schema(args.schemas / "card_transaction.avsc")
    prediction_schema = load_schema(args.schemas / "prediction.avsc")
    session = onnx_session(args.model)
    store = redis.Redis.from_url(args.redis_url)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": store_offsets,
            "enable.auto.offset.store": False,
        }
    )
    producer = Producer({"bootstrap.servers": args.bootstrap, **PRODUCER_SETTINGS})
    consumer.subscribe([args.input])
    ready("handloop")
    while running:
        msg = consumer.poll(0.1)
        if msg is None or msg.error() is not None:
            continue
        event = fastavro.schemaless_reader(io.BytesIO(msg.value()), event_schema, None)
        pipe = store.pipeline(transaction=False)
        pipe.hmget(card_key(args.key_prefix, event), CARD_FIELDS)
        pipe.hmget(merchant_key(args.key_prefix, event), MERCHANT_FIELDS)
        card, merchant = pipe.execute()
        row = np.array([feature_row(event, card, merchant)], dtype=np.float32)
        probability, label = score(session, row)
        out = io.BytesIO()
        fastavro.schemaless_writer(
            out,
            prediction_schema,
            prediction(
                event, probability[0], label[0], args.model_version, (msg.topic(), msg.partition(), msg.offset())
            ),
        )
        producer.produce(args.output, out.getvalue(), msg.key())
        producer.poll(0)
        if store_offsets:
            consumer.store_offsets(message=msg)
        else:
            consumer.commit(message=msg, asynchronous=True)
    producer.flush(30)
    consumer.close()


if __name__ == "__main__":
    main()
