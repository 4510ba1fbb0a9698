"""produce_avro after a broker restart: records a stuck producer never sent are produced again by a new one, once
each and in order; records it never acknowledges still fail the call. librdkafka's stuck state (an unknown partition
leader kept for minutes, librdkafka #4976) cannot be provoked on demand, so a stand-in Producer plays it."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from confluent_kafka import KafkaError

from streamserve.errors import StreamServeError
from streamserve.ops import tools

SCHEMA = fastavro.parse_schema(
    {"type": "record", "name": "E", "fields": [{"name": "id", "type": "string"}, {"name": "n", "type": "long"}]}
)


class Message:
    def __init__(self, key: bytes | None, value: bytes) -> None:
        self._key, self._value = key, value

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value


class StuckThenFine:
    """The first producer sends `sent_before_stuck` records and then holds the rest queued (flush leaves them);
    every later producer delivers everything. `delivered` is what reached the topic, in order."""

    delivered: list[tuple[bytes | None, bytes]] = []
    made = 0
    sent_before_stuck = 3
    stuck_forever = False

    def __init__(self, config: dict[str, Any]) -> None:
        type(self).made += 1
        self.stuck = type(self).made == 1 or type(self).stuck_forever
        self.queue: list[tuple[Message, Any]] = []
        self.reports: list[tuple[Any, Message, Any]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None, on_delivery: Any = None) -> None:
        message = Message(key, value)
        if self.stuck and len(StuckThenFine.delivered) >= StuckThenFine.sent_before_stuck:
            self.queue.append((message, on_delivery))
            return
        StuckThenFine.delivered.append((key, value))
        self.reports.append((None, message, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        reports, self.reports = self.reports, []
        for err, message, callback in reports:
            callback(err, message)
        return len(reports)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return len(self.queue)

    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        queue, self.queue = self.queue, []
        self.reports += [(KafkaError(KafkaError._PURGE_QUEUE), message, callback) for message, callback in queue]


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StuckThenFine]:
    StuckThenFine.delivered, StuckThenFine.made, StuckThenFine.stuck_forever = [], 0, False
    monkeypatch.setattr(tools, "Producer", StuckThenFine)
    return StuckThenFine


def records(n: int) -> list[dict[str, Any]]:
    return [{"id": f"e{i}", "n": i} for i in range(n)]


def avro(record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, SCHEMA, record)
    return buffer.getvalue()


def test_records_a_stuck_producer_never_sent_are_produced_again_once_in_order(stand_in: type[StuckThenFine]) -> None:
    assert tools.produce_avro({}, "t", SCHEMA, records(10), "id") == 10
    assert stand_in.made == 2, "one new producer took over"
    assert stand_in.delivered == [(f"e{i}".encode(), avro({"id": f"e{i}", "n": i})) for i in range(10)]


def test_records_that_stay_unsent_fail_the_call(stand_in: type[StuckThenFine]) -> None:
    stand_in.stuck_forever = True
    with pytest.raises(StreamServeError, match="7 events not acknowledged"):
        tools.produce_avro({}, "t", SCHEMA, records(10), "id")
    assert stand_in.made == 1 + tools.STUCK_RETRIES
    assert len(stand_in.delivered) == 3
