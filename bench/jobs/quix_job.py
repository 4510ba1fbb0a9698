"""The job in Quix Streams, as its docs write a pipeline: Application -> topics with Avro serializers ->
StreamingDataFrame.apply steps -> to_topic. Runs in bench/.venvs/quix.

A StreamingDataFrame processes one record at a time, so each event makes its own Redis round trip and
its own onnxruntime call; Quix batches only the Kafka I/O underneath.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import redis
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
from quixstreams import Application, message_context
from quixstreams.models.serializers.avro import AvroDeserializer, AvroSerializer


def main() -> None:
    args = parse_args(__doc__ or "")
    session = onnx_session(args.model)
    store = redis.Redis.from_url(args.redis_url)

    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        auto_create_topics=False,  # the harness created them
        loglevel="WARNING",
    )
    events = app.topic(
        args.input, value_deserializer=AvroDeserializer(load_schema(args.schemas / "card_transaction.avsc"))
    )
    predictions = app.topic(args.output, value_serializer=AvroSerializer(load_schema(args.schemas / "prediction.avsc")))

    def add_features(event: dict[str, Any]) -> dict[str, Any]:
        pipe = store.pipeline(transaction=False)
        pipe.hmget(card_key(args.key_prefix, event), CARD_FIELDS)
        pipe.hmget(merchant_key(args.key_prefix, event), MERCHANT_FIELDS)
        card, merchant = pipe.execute()
        return {"event": event, "features": feature_row(event, card, merchant)}

    def predict(enriched: dict[str, Any]) -> dict[str, Any]:
        probability, label = score(session, np.array([enriched["features"]], dtype=np.float32))
        ctx = message_context()
        return prediction(
            enriched["event"], probability[0], label[0], args.model_version, (ctx.topic, ctx.partition, ctx.offset)
        )

    sdf = app.dataframe(events)
    sdf = sdf.apply(add_features).apply(predict)
    sdf.to_topic(predictions)
    ready("quix")
    app.run()


if __name__ == "__main__":
    main()
