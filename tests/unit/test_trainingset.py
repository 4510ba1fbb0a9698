"""The training-set join with no Kafka: each logged event with a label makes one example whatever the order,
and no label or byte string stops it or makes a wrong example."""

from __future__ import annotations

import io
import random
import zlib
from typing import Any

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st

from streamserve.monitor.trainingset import TrainingJoin
from streamserve.schemas import bundled

LOG, LABEL, EXAMPLE = bundled("feature_log"), bundled("label"), bundled("training_example")


def avro(schema: Any, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def logged(event_id: str, score: float = 0.5) -> bytes:
    return avro(
        LOG,
        {
            "event_id": event_id, "event_time": 1_700_000_000_000, "model_name": "pumps", "model_version": "v3",
            "score": score, "label": "ok", "logged_at": 1_700_000_000_500,
            "features": {"site": "north", "temperature_c": 61.5, "vibration": [0.1, 0.2], "gone": None},
        },
    )  # fmt: skip


def label(event_id: str, value: object = "failure_imminent") -> bytes:
    return avro(LABEL, {"event_id": event_id, "label": value, "label_time": 1_700_003_600_000})


def read(value: bytes) -> dict[str, Any]:
    record = fastavro.schemaless_reader(io.BytesIO(value), EXAMPLE, None)
    assert isinstance(record, dict)
    return record


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), events=st.integers(1, 60))
def test_every_logged_and_labelled_event_joins_once_whatever_the_order(seed: int, events: int) -> None:
    rng = random.Random(seed)
    ids = [f"e{i}" for i in range(events)]
    labels = {event_id: rng.choice([0, 1, "late", 2.5]) for event_id in ids}
    stream = [("log", e) for e in ids] + [("label", e) for e in ids]
    stream += [("label", rng.choice(ids)) for _ in range(events // 3)]  # duplicate labels
    stream += [("label", f"unknown-{i}") for i in range(3)]  # never logged
    rng.shuffle(stream)
    join = TrainingJoin()
    examples = {}
    for side, event_id in stream:
        out = (
            join.offer_log(logged(event_id))
            if side == "log"
            else join.offer_label(label(event_id, labels.get(event_id, 1)))
        )
        if out is not None:
            assert out[0].decode() not in examples
            examples[out[0].decode()] = read(out[1])
    assert set(examples) == set(ids)
    for event_id, example in examples.items():
        assert example["label"] == labels[event_id]
        assert example["features"] == {"site": "north", "temperature_c": 61.5, "vibration": [0.1, 0.2], "gone": None}
        assert (example["predicted_label"], example["model_version"], example["score"]) == ("ok", "v3", 0.5)
    assert join.counts.examples == events
    assert join.pending == 3  # the unknown ids' labels wait (and would expire)


def test_garbage_and_wrong_labels_are_counted_never_joined() -> None:
    join = TrainingJoin()
    assert join.offer_log(logged("a")) is None
    wrong = avro({"type": "record", "name": "Label", "fields": [{"name": "event_id", "type": "string"},
                                                                  {"name": "label", "type": "boolean"}]},
                 {"event_id": "a", "label": True})  # fmt: skip
    for bad in (b"", None, b"\xff\xfe\x00garbage", wrong, label("a")[:-2], label("a", None), label("") + b"x"):
        assert join.offer_label(bad) is None
    assert join.counts.bad_labels == 7
    assert join.offer_log(b"\x00\x01") is None
    assert join.counts.bad_logs == 1
    out = join.offer_label(label("a", 1))
    assert out is not None
    assert read(out[1])["label"] == 1
    assert join.offer_label(label("a", 0)) is None
    assert join.counts.duplicates == 1


def test_labels_of_unsampled_events_are_dropped_on_sight_and_the_buffer_is_bounded() -> None:
    share = 0.1
    join = TrainingJoin(share, max_pending=50)
    ids = [f"id-{i}" for i in range(2000)]
    sampled = [e for e in ids if zlib.crc32(e.encode()) < share * 2**32]
    for event_id in ids:
        join.offer_label(label(event_id))
    assert join.counts.unsampled == len(ids) - len(sampled)
    assert join.pending == 50
    assert join.counts.expired == len(sampled) - 50
    last = sampled[-1]  # the newest waiting label still joins
    assert join.offer_log(logged(last)) is not None
