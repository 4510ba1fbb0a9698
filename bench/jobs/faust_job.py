"""The job in faust-streaming, as its docs write one: an App, topics with a registered Avro codec, and an
agent that micro-batches its stream with ``stream.take()``. Runs in bench/.venvs/faust.

Each batch makes one pipelined Redis round trip (redis.asyncio) and one onnxruntime call; predictions
are sent with ``topic.send`` (faust attaches them to the batch's events and publishes on ack).
"""

from __future__ import annotations

import io
import sys
from typing import Any

import fastavro
import faust
import numpy as np
import redis.asyncio as aioredis
from faust.serializers import codecs
from jobcommon import (
    CARD_FIELDS,
    MERCHANT_FIELDS,
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


class AvroCodec(codecs.Codec):
    """Schemaless Avro with a schema both sides know."""

    def __init__(self, schema: Any, **kwargs: Any) -> None:
        self.schema = schema
        super().__init__(**kwargs)

    def _loads(self, s: bytes) -> Any:
        return fastavro.schemaless_reader(io.BytesIO(s), self.schema, None)

    def _dumps(self, obj: Any) -> bytes:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self.schema, obj)
        return out.getvalue()


args = parse_args(__doc__ or "")
codecs.register("card_transaction", AvroCodec(load_schema(args.schemas / "card_transaction.avsc")))
codecs.register("prediction", AvroCodec(load_schema(args.schemas / "prediction.avsc")))

app = faust.App(
    args.group,
    broker=f"kafka://{args.bootstrap}",
    consumer_auto_offset_reset="earliest",
    topic_allow_declare=False,  # the harness created the topics (faust stops on a partition-count mismatch)
    web_enabled=False,
)
events_topic = app.topic(args.input, key_type=bytes, value_serializer="card_transaction", key_serializer="raw")
predictions_topic = app.topic(args.output, key_type=bytes, value_serializer="prediction", key_serializer="raw")
session = onnx_session(args.model)
store = aioredis.Redis.from_url(args.redis_url)


@app.agent(events_topic)
async def score_events(stream: faust.StreamT[Any]) -> None:
    async for batch in stream.take_events(args.batch_size, within=0.01):
        events = [e.value for e in batch]
        pipe = store.pipeline(transaction=False)
        for event in events:
            pipe.hmget(card_key(args.key_prefix, event), CARD_FIELDS)
            pipe.hmget(merchant_key(args.key_prefix, event), MERCHANT_FIELDS)
        replies = await pipe.execute()
        rows = np.array(
            [feature_row(event, replies[2 * i], replies[2 * i + 1]) for i, event in enumerate(events)],
            dtype=np.float32,
        )
        probabilities, labels = score(session, rows)
        for e, probability, label in zip(batch, probabilities, labels, strict=True):
            message = e.message
            await predictions_topic.send(
                key=message.key,
                value=prediction(
                    e.value, probability, label, args.model_version, (message.topic, message.partition, message.offset)
                ),
            )


@app.task
async def announce() -> None:
    ready("faust")


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "worker", "--loglevel", "warn"]
    app.main()
