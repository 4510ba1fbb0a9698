"""Helpers of the poison-pill suite: reading whole topics up to their end, the group's lag and offsets, and
models built without streamserve's code (a maintenance model that fails on an unseen category, a tiny
regressor over one float input)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from streamserve.demo.maintenance import STRING_INPUTS, Machines, condition, make_readings, model_inputs, to_onnx
from tests.integration.harness import WorkerProcess, wait_until


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
