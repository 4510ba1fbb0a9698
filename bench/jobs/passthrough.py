"""The Kafka limit: consume -> produce with confluent-kafka's batch APIs, no decoding, no work.

Values and keys are copied as they are, to the same partition number, with streamserve's producer
settings. Offsets are committed asynchronously after each batch was handed to the producer.
"""

from __future__ import annotations

import signal
from types import FrameType

from confluent_kafka import Consumer, KafkaError, Producer
from jobcommon import PRODUCER_SETTINGS, parse_args, ready

BATCH = 1000


def main() -> None:
    args = parse_args(__doc__ or "")
    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer({"bootstrap.servers": args.bootstrap, **PRODUCER_SETTINGS})
    consumer.subscribe([args.input])
    ready("passthrough")
    while running:
        messages = consumer.consume(BATCH, 0.005)
        if not messages:
            producer.poll(0)
            continue
        batch = [
            {"value": m.value(), "key": m.key(), "partition": m.partition()}
            for m in messages
            if m.error() is None or m.error().code() != KafkaError._PARTITION_EOF
        ]
        while batch:
            queued = producer.produce_batch(args.output, batch)
            if queued == len(batch):
                break
            batch = [m for m in batch if "_error" in m]  # queue full: serve deliveries, retry the rest
            for m in batch:
                del m["_error"]
            producer.poll(0.05)
        producer.poll(0)
        consumer.commit(asynchronous=True)
    producer.flush(30)
    consumer.close()


if __name__ == "__main__":
    main()
