"""Helpers of the poison-pill suite: models built without streamserve's code (a maintenance model that fails
on an unseen category, a tiny regressor over one float input), whole topics read up to their end, the group's
lag and offsets, and the input records of a test counted per id in the predictions and dead letters."""

from __future__ import annotations

import copy
import io
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streamserve.demo.maintenance import STRING_INPUTS, Machines, condition, make_readings, model_inputs, to_onnx
from streamserve.pipeline.deadletter import (
    HEADER_ERROR_MESSAGE,
    HEADER_KIP1034_MESSAGE,
    HEADER_SOURCE_TOPIC,
    HEADER_STAGE,
    HEADER_VALUE_REPLACED,
)
from streamserve.pipeline.decode import load_schema
from streamserve.pipeline.encode import decode_prediction
from tests.integration.harness import WorkerProcess, headers_of, wait_until


def _frame(inputs: dict[str, np.ndarray]) -> Any:
    """One DataFrame column per scalar input, vector inputs spread over numbered columns (as to_onnx expects)."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for name, values in inputs.items():
        if values.shape[1] == 1:
            columns[name] = values[:, 0]
        else:
            columns.update({f"{name}_{i}": values[:, i] for i in range(values.shape[1])})
    return pd.DataFrame(columns)


def train_strict_maintenance(machines: Machines, out_dir: Path, rows: int = 2000) -> Path:
    """The maintenance v1 model with OneHotEncoder(handle_unknown="error"): onnxruntime fails the whole
    batch when one row has a category it never saw (e.g. site "atlantis")."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    inputs = model_inputs(list(make_readings(machines, rows, seed=1)), machines)
    frame = _frame(inputs)
    numeric = [c for c in frame.columns if c not in STRING_INPUTS]
    pipeline = Pipeline(
        [
            (
                "columns",
                ColumnTransformer(
                    [
                        ("categories", OneHotEncoder(handle_unknown="error"), list(STRING_INPUTS)),
                        ("numbers", StandardScaler(), numeric),
                    ]
                ),
            ),
            ("classifier", LogisticRegression(max_iter=1000)),
        ]
    )
    pipeline.fit(frame, condition(inputs, np.random.default_rng(1)))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "maintenance-strict.onnx"
    path.write_bytes(to_onnx(pipeline, frame).SerializeToString())
    return path


def make_affine_model(path: Path, slope: float, intercept: float) -> Path:
    """score = slope * X + intercept, X a [batch, 1] float input: a regressor with a known formula."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["X", "slope"], ["scaled"]),
            helper.make_node("Add", ["scaled", "intercept"], ["score"]),
        ],
        "affine",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [
            helper.make_tensor("slope", TensorProto.FLOAT, [], [slope]),
            helper.make_tensor("intercept", TensorProto.FLOAT, [], [intercept]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# --- topics and the consumer group ----------------------------------------------------------------------------


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """High watermark of every partition of a topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"watermarks-{uuid.uuid4()}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] for p in partitions
        }
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, timeout_s: float = 60) -> list[Message]:
    """Every record of a topic up to its current end offsets (no waiting for records that may never come)."""
    end = end_offsets(bootstrap, topic)
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4()}", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, 0) for p, high in end.items() if high > 0])
    remaining = {p for p, high in end.items() if high > 0}
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while remaining:
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic}: partitions {sorted(remaining)} not read to {end} in {timeout_s:.0f}s")
            for msg in consumer.consume(1000, 0.2):
                if msg.error() is not None or msg.offset() >= end[msg.partition()]:
                    continue
                messages.append(msg)
                if msg.offset() == end[msg.partition()] - 1:
                    remaining.discard(msg.partition())
            # On a transactional topic the last offset is a commit marker, never delivered: the position
            # passing the end offset is what says the partition is read.
            for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                if tp.offset >= end[tp.partition]:
                    remaining.discard(tp.partition)
    finally:
        consumer.close()
    return messages


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
    """The group's committed offset of each partition (negative when it has none)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in partitions])
    result = admin.list_consumer_group_offsets([request])[group].result(timeout=10)
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Records of each input partition past the group's committed offset (partitions with none left out)."""
    end = end_offsets(bootstrap, topic)
    committed = committed_offsets(bootstrap, group, topic, sorted(end))
    behind = {p: high - max(committed.get(p, 0), 0) for p, high in end.items()}
    return {p: n for p, n in behind.items() if n}


def wait_lag_zero(bootstrap: str, group: str, topic: str, worker: WorkerProcess, timeout_s: float = 90) -> None:
    """Poll until the group has committed every input record, failing at once if the worker died."""

    def caught_up() -> bool:
        worker.assert_alive()
        return not lag(bootstrap, group, topic)

    try:
        wait_until(caught_up, timeout_s, f"the lag of group {group} to reach 0", interval_s=0.3)
    except AssertionError as exc:
        worker.assert_alive()
        raise AssertionError(f"{exc}; behind per partition: {lag(bootstrap, group, topic)}") from None


def rewind_group(bootstrap: str, group: str, topic: str, offsets: dict[int, int], timeout_s: float = 60) -> None:
    """Set the group's committed offsets (once its killed member's session expired and the group is empty)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p, o) for p, o in offsets.items()])
    errors: list[str] = []

    def rewound() -> bool:
        try:
            result = admin.alter_consumer_group_offsets([request])[group].result(timeout=10)
        except KafkaException as exc:
            errors.append(str(exc))
            return False
        # Refused per partition while the dead member is in the group (until its session times out).
        errors.extend(str(tp.error) for tp in result.topic_partitions if tp.error is not None)
        return all(tp.error is None for tp in result.topic_partitions)

    try:
        wait_until(rewound, timeout_s, f"group {group} to accept new offsets", interval_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last error: {errors[-1:]}") from None
    assert committed_offsets(bootstrap, group, topic, sorted(offsets)) == offsets


# --- records of a test and where they ended --------------------------------------------------------------------


@dataclass
class Pill:
    """One input record: its identity, bytes, and where it must end (stage None: predicted)."""

    ident: str
    key: bytes | None
    value: bytes | None
    stage: str | None = None
    reason: str = ""
    """Text the dead letter's error message must contain."""
    reading: dict[str, Any] | None = None
    """The reading as written (predicted records are scored offline from it)."""


class Records:
    """The records of one pipeline, written with its schema and produced in order."""

    def __init__(self, schema_path: Path, key_field: str, id_field: str) -> None:
        self.schema = load_schema(schema_path)
        self.raw_schema = json.loads(schema_path.read_text())
        self.key_field, self.id_field = key_field, id_field

    def avro(self, record: dict[str, Any], schema: Any = None) -> bytes:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema or self.schema, record)
        return buffer.getvalue()

    def reading(self, record: dict[str, Any], stage: str | None = None, reason: str = "") -> Pill:
        key = str(record[self.key_field]).encode()
        return Pill(str(record[self.id_field]), key, self.avro(record), stage, reason, record)

    def produce(self, bootstrap: str, topic: str, pills: list[Pill]) -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
        for pill in pills:
            producer.produce(topic, pill.value, pill.key)
            producer.poll(0)
        assert producer.flush(60) == 0, "the broker did not acknowledge every input record"

    def ident(self, msg: Message) -> str:
        """A dead letter's input record: its `poison-*` key, or the id in its (decodable) value."""
        key = msg.key() or b""
        if key.startswith(b"poison-"):
            return key.decode()
        return str(fastavro.schemaless_reader(io.BytesIO(msg.value()), self.schema, None)[self.id_field])


def interleave(normal: list[Pill], pills: list[Pill]) -> list[Pill]:
    """The pills spread evenly among the normal records."""
    out, step = [], max(1, len(normal) // (len(pills) + 1))
    for i, pill in enumerate(pills):
        out += [*normal[i * step : (i + 1) * step], pill]
    return out + normal[len(pills) * step :]


@dataclass
class Outcome:
    """What the output and dead-letter topics hold, per input record."""

    predicted: dict[str, list[dict[str, Any]]]
    dead: dict[str, list[Message]]

    def count(self, ident: str) -> tuple[int, int]:
        return len(self.predicted.get(ident, [])), len(self.dead.get(ident, []))


def outcome(bootstrap: str, settings: Any, records: Records) -> Outcome:
    schema = load_schema(settings.output.schema_path)
    predicted: dict[str, list[dict[str, Any]]] = {}
    for msg in read_all(bootstrap, settings.output.topic):
        record = decode_prediction(schema, msg.value())
        predicted.setdefault(record["event_id"], []).append(record)
    dead: dict[str, list[Message]] = {}
    for msg in read_all(bootstrap, settings.output.dead_letter_topic):
        dead.setdefault(records.ident(msg), []).append(msg)
    return Outcome(predicted, dead)


def assert_each_in_one_place(result: Outcome, once: list[Pill], twice: Sequence[Pill] = ()) -> None:
    """Every pill once (`twice`: read again after a crash) in the place it belongs, predictions or dead
    letters, never in the other; and nothing else in either."""
    wrong = {}
    for times, pills in ((1, once), (2, twice)):
        for pill in pills:
            expected = (times, 0) if pill.stage is None else (0, times)
            if result.count(pill.ident) != expected:
                wrong[pill.ident] = f"(predictions, dead letters) {result.count(pill.ident)}, expected {expected}"
    assert not wrong, f"{len(wrong)} records misplaced: {dict(list(wrong.items())[:10])}"
    unknown = (result.predicted.keys() | result.dead.keys()) - {p.ident for p in [*once, *twice]}
    assert not unknown, f"outputs for records never produced: {sorted(unknown)[:10]}"


def assert_dead_letters(result: Outcome, pills: list[Pill], topic: str) -> None:
    """Each dead letter says which stage failed and why, and keeps the original bytes (or a reference)."""
    for pill in pills:
        if pill.stage is None:
            continue
        for msg in result.dead[pill.ident]:
            headers = headers_of(msg)
            message = headers[HEADER_ERROR_MESSAGE].decode()
            assert (headers[HEADER_STAGE].decode(), pill.reason in message) == (pill.stage, True), (
                f"{pill.ident}: stage {headers[HEADER_STAGE]!r}, message {message!r}; expected stage {pill.stage!r}"
                f" and a message with {pill.reason!r}"
            )
            assert headers[HEADER_KIP1034_MESSAGE] == headers[HEADER_ERROR_MESSAGE]
            assert headers[HEADER_SOURCE_TOPIC] == topic.encode()
            assert msg.key() == pill.key
            if HEADER_VALUE_REPLACED not in headers:
                assert msg.value() == pill.value, f"{pill.ident}: the dead letter's value is not the original"


def variant(reading: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of a reading with a new id and some fields changed (``machine__firmware__major`` for nested ones)."""
    out = copy.deepcopy(reading)
    out["reading_id"] = str(uuid.uuid4())
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = value
    return out
