"""Poison pills on the real broker and Redis (issue 10): every kind of bad record ends in the dead-letter topic
with a clear reason (or is predicted, where the policy says so), the worker stays alive, every other record
is predicted exactly as offline onnxruntime scores it, the group's lag reaches 0, and a worker restarted after
each case group (SIGTERM, and once kill -9 with the poison records read again) does not fail again.

Every input record is identified (its reading id, or for bytes that are not a reading the Kafka key
``poison-*``) and counted in the predictions and the dead letters: each is in exactly one of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import onnxruntime as ort
import pytest
import redis

from streamserve.demo.maintenance import CLASSES, Machines, TrainedModel, make_readings, model_inputs
from streamserve.pipeline.deadletter import (
    HEADER_ERROR_MESSAGE,
    HEADER_STAGE,
    HEADER_VALUE_REPLACED,
)
from tests.integration.harness import SCHEMAS, Pipeline, WorkerProcess, headers_of, unique
from tests.integration.maintenance import MaintenancePipeline
from tests.integration.poison import (
    Outcome,
    Pill,
    Records,
    assert_dead_letters,
    assert_each_in_one_place,
    end_offsets,
    interleave,
    make_affine_model,
    outcome,
    rewind_group,
    train_strict_maintenance,
    variant,
    wait_lag_zero,
)
from tests.integration.servers import Servers

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAILURE = CLASSES.index("failure_imminent")


def assert_predicted_like_offline(
    result: Outcome, model: TrainedModel | Path, pills: list[Pill], machines: Machines
) -> None:
    """Labels and probability vectors of onnxruntime on inputs rebuilt from the raw readings; copied fields."""
    readings = [p.reading for p in pills if p.stage is None and p.reading is not None]
    path = model.path if isinstance(model, TrainedModel) else model
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], model_inputs(readings, machines))
    got = [result.predicted[r["reading_id"]][0] for r in readings]
    assert [g["predicted_class"] for g in got] == labels.tolist()
    np.testing.assert_allclose([g["score"] for g in got], probabilities[:, FAILURE], rtol=0, atol=1e-6)
    vectors = np.array([[g["probabilities"][c] for c in CLASSES] for g in got])
    np.testing.assert_allclose(vectors, probabilities, rtol=0, atol=1e-6)
    for reading, record in zip(readings, got, strict=True):
        assert (record["key"], record["site"], record["machine_model"]) == (
            reading["machine_id"],
            reading["site"],
            reading["machine"]["model"],
        )
        time_ms = None if record["event_time"] is None else (record["event_time"] - EPOCH) // timedelta(milliseconds=1)
        assert time_ms == reading["event_time"]


# --- the maintenance example: decode, feature and edge-value pills, restarts --------------------------------


def unknown_enum_symbol(records: Records, base: dict[str, Any]) -> bytes:
    """A reading written by a producer whose schema has a fifth operating mode, TURBO (symbol index 4)."""
    extended = copy.deepcopy(records.raw_schema)
    mode = next(f for f in extended["fields"] if f["name"] == "mode")
    mode["type"]["symbols"].append("TURBO")
    return records.avro(variant(base, mode="TURBO"), fastavro.parse_schema(extended))


def decode_pills(records: Records, base: dict[str, Any], rng: np.random.Generator) -> tuple[list[Pill], bytes]:
    """Bytes that are not a reading of this schema; returns them and the 999,800-byte value."""
    huge = rng.bytes(999_800)
    valid = records.avro(variant(base))
    other = json.loads((SCHEMAS / "card_transaction.avsc").read_text())
    card = {
        "event_id": str(uuid.uuid4()),  # a valid uuid: the reading's first field decodes
        "card_id": "card-1",
        "merchant_id": "merchant-1",
        "amount": 12.5,
        "hour_of_day": 3,
        "is_online": True,
        "event_time": 1_700_000_000_000,
    }
    turbo = unknown_enum_symbol(records, base)
    invalid = "not a valid Avro record"
    pills = [
        Pill("poison-990k", b"poison-990k", rng.bytes(990_000), "decode", invalid),
        Pill("poison-999800", b"poison-999800", huge, "decode", invalid),
        Pill("poison-random", b"poison-random", rng.bytes(77), "decode", invalid),
        Pill("poison-truncated-half", b"poison-truncated-half", valid[: len(valid) // 2], "decode", invalid),
        Pill("poison-truncated-last-byte", b"poison-truncated-last-byte", valid[:-1], "decode", invalid),
        Pill("poison-other-schema", b"poison-other-schema", records.avro(card, fastavro.parse_schema(other)), "decode"),
        Pill("poison-tombstone", b"poison-tombstone", None, "decode", "empty value"),
        Pill("poison-unknown-enum-symbol", b"poison-unknown-enum-symbol", turbo, "decode", invalid),
    ]
    return pills, huge


def feature_pills(records: Records, base: dict[str, Any]) -> list[Pill]:
    """Readings that decode but whose features cannot be built: dead letters of stage `features`."""
    pills = []
    for value in (math.nan, math.inf, -math.inf):
        pills += [
            records.reading(variant(base, temperature_c=value), "features", "feature 'temperature_c'"),
            records.reading(variant(base, pressure_bar=value), "features", "feature 'pressure_bar'"),
            records.reading(variant(base, vibration_rms=[0.5, value, 0.5, 0.5]), "features", "feature 'vibration'"),
        ]
    for value in (1e300, -1e300):
        pills.append(records.reading(variant(base, temperature_c=value), "features", "is out of float32 range"))
    pills.append(records.reading(variant(base, vibration_rms=[1.0, 2.0]), "features", "expected 4 values, got 2"))
    return pills


def edge_pills(records: Records, base: dict[str, Any]) -> list[Pill]:
    """Odd but valid readings the policy predicts: nulls take defaults, unknown categories go to the model."""
    predicted = [
        variant(base, site=None, temperature_c=None, event_time=None),
        variant(base, site=None),
        variant(base, temperature_c=None),
        variant(base, event_time=None),
        variant(base, pressure_bar=-1e30),
        variant(base, machine__firmware__major=-(2**31)),
        variant(base, machine__firmware__major=2**31 - 1, machine__firmware__minor=-(2**31)),
        variant(base, load_pct=Decimal("-999.99")),
        variant(base, load_pct=Decimal("999.99")),
        variant(base, temperature_c=-273.15, vibration_rms=[0.0, 0.0, 0.0, 0.0]),
        variant(base, site=""),
        variant(base, site="Zürich-北"),
        variant(base, site="🏭 plant\u200d\u0000"),
        variant(base, machine_id="機械-ü-🚀"),  # no Redis hash: its Redis features take their defaults
        variant(base, machine_id=""),
        variant(base, mode="MAINTENANCE"),  # not in the vocabulary: the `unknown` column
    ]
    return [records.reading(r) for r in predicted]


def test_poison_pills_are_dead_lettered_or_predicted_and_restarted_workers_do_not_fail_again(
    example: MaintenancePipeline, machines: Machines, maintenance_models: dict[str, TrainedModel], tmp_path: Path
) -> None:
    s, bootstrap = example.settings, example.bootstrap
    group, topic = s.kafka.group_id, s.input.topic
    records = Records(s.input.schema_path, "machine_id", "reading_id")
    rng = np.random.default_rng(10)
    normal = [records.reading(r) for r in make_readings(machines, 900, seed=41)]
    base = normal[0].reading
    assert base is not None
    decode, huge = decode_pills(records, base, rng)
    phase_a = interleave(normal[:300], decode)
    phase_b = interleave(normal[300:600], feature_pills(records, base) + edge_pills(records, base))
    phase_c = normal[600:]

    # Phase A, records that do not decode: produced first, then a worker; SIGTERM once the lag is 0.
    records.produce(bootstrap, topic, phase_a)
    first = WorkerProcess(example.path, tmp_path, unique("w-a"))
    wait_lag_zero(bootstrap, group, topic, first)
    first.assert_alive()
    result = outcome(bootstrap, s, records)
    assert_each_in_one_place(result, phase_a)
    assert first.stop() == 0, first.log_tail()

    # Phase B, feature pills and odd valid readings, produced while a new worker runs; that worker is killed
    # (-9) and the group rewound to the phase's start, as a crash before the commit leaves it: the next worker
    # reads every record of the phase again, poison pills included. (The commit follows the acknowledgements
    # within milliseconds, so a kill cannot be timed between them.)
    start_b = end_offsets(bootstrap, topic)
    second = WorkerProcess(example.path, tmp_path, unique("w-b"))
    second.wait_logged(" serving ")
    records.produce(bootstrap, topic, phase_b)
    wait_lag_zero(bootstrap, group, topic, second)
    second.assert_alive()
    result = outcome(bootstrap, s, records)
    assert_each_in_one_place(result, phase_a + phase_b)
    second.kill()
    rewind_group(bootstrap, group, topic, start_b)
    third = WorkerProcess(example.path, tmp_path, unique("w-b-again"))
    wait_lag_zero(bootstrap, group, topic, third)
    third.assert_alive()
    replayed = outcome(bootstrap, s, records)
    assert_each_in_one_place(replayed, phase_a, twice=phase_b)  # phase B re-read once, each to the same place
    assert third.stop() == 0, third.log_tail()

    # Phase C, normal readings after a clean restart: nothing earlier is read again, nothing fails.
    fourth = WorkerProcess(example.path, tmp_path, unique("w-c"))
    fourth.wait_logged(" serving ")
    records.produce(bootstrap, topic, phase_c)
    wait_lag_zero(bootstrap, group, topic, fourth)
    fourth.assert_alive()
    final = outcome(bootstrap, s, records)
    assert fourth.stop() == 0, fourth.log_tail()
    assert_each_in_one_place(final, phase_a + phase_c, twice=phase_b)

    everything = phase_a + phase_b + phase_c
    assert_predicted_like_offline(final, maintenance_models["v1"], everything, machines)
    for phase in (phase_a, phase_b):  # the predictions of the re-read records equal the first ones
        for pill in phase:
            scores = {(r["predicted_class"], r["score"]) for r in final.predicted.get(pill.ident, [])}
            assert len(scores) <= 1, f"{pill.ident} scored differently when read again: {scores}"

    # The 999,800-byte value cannot be dead-lettered as it is: a reference with its size and digest.
    (referenced,) = final.dead["poison-999800"]
    assert headers_of(referenced)[HEADER_VALUE_REPLACED] == b"reference"
    assert json.loads(referenced.value())["value"] == {"size": len(huge), "sha256": hashlib.sha256(huge).hexdigest()}
    assert HEADER_VALUE_REPLACED not in headers_of(final.dead["poison-990k"][0]), "990 KB fits: original bytes"

    # Last, the reasons: each names the stage and what is wrong with the record.
    assert_dead_letters(final, everything, topic)


# --- a model that fails on one row: the batch is bisected -----------------------------------------------------

STRICT_BATCH = 302
"""All the records of a phase, so that they are scored as one batch (the size bound closes it)."""
_PROGRESS = re.compile(r"events=(\d+) predictions=(\d+) dead_letters=(\d+) batches=(\d+)")


@pytest.fixture(scope="module")
def strict_model(tmp_path_factory: pytest.TempPathFactory, machines: Machines) -> Path:
    return train_strict_maintenance(machines, tmp_path_factory.mktemp("strict"))


def test_a_model_failing_on_one_row_dead_letters_that_row_alone_and_predicts_its_batch_neighbours(
    stack: Servers, redis_client: redis.Redis, machines: Machines, strict_model: Path, tmp_path: Path
) -> None:
    pipe = MaintenancePipeline(
        stack.bootstrap_servers,
        stack.redis_url,
        tmp_path,
        strict_model,
        partitions=1,
        overrides={"batch.max_batch_size": STRICT_BATCH, "batch.max_wait_ms": 2_000},
    )
    pipe.create_topics()
    pipe.load_machines(redis_client, machines)
    s, bootstrap = pipe.settings, pipe.bootstrap
    records = Records(s.input.schema_path, "machine_id", "reading_id")
    readings = list(make_readings(machines, 2 * STRICT_BATCH, seed=51))
    first = [records.reading(r) for r in readings[: STRICT_BATCH - 2]]
    unseen = [
        records.reading(variant(readings[7], site="atlantis"), "infer", "Unknown Category"),
        records.reading(variant(readings[200], site="atlantis"), "infer", "Unknown Category"),
    ]
    batch = first[:7] + unseen[:1] + first[7:200] + unseen[1:] + first[200:]
    assert len(batch) == STRICT_BATCH
    records.produce(bootstrap, s.input.topic, batch)  # before the worker starts: one batch holds them all

    worker = WorkerProcess(pipe.path, tmp_path, unique("w-strict"))
    wait_lag_zero(bootstrap, s.kafka.group_id, s.input.topic, worker)
    worker.assert_alive()
    assert worker.stop() == 0, worker.log_tail()
    progress = _PROGRESS.findall(worker.log_path.read_text(errors="replace"))
    assert progress[-1] == (str(STRICT_BATCH), str(STRICT_BATCH - 2), "2", "1"), "the pills shared one batch"

    restarted = WorkerProcess(pipe.path, tmp_path, unique("w-strict-again"))
    second = [records.reading(r) for r in readings[STRICT_BATCH:]]
    records.produce(bootstrap, s.input.topic, second)
    wait_lag_zero(bootstrap, s.kafka.group_id, s.input.topic, restarted)
    restarted.assert_alive()
    result = outcome(bootstrap, s, records)
    assert restarted.stop() == 0, restarted.log_tail()

    assert_each_in_one_place(result, batch + second)
    assert_predicted_like_offline(result, strict_model, batch + second, machines)
    assert_dead_letters(result, batch, s.input.topic)


# --- a string where the model wants a number ------------------------------------------------------------------

GAUGE_SCHEMA = {
    "type": "record",
    "name": "GaugeReading",
    "namespace": "io.streamserve.tests",
    "fields": [
        {"name": "reading_id", "type": "string"},
        {"name": "gauge_id", "type": "string"},
        {"name": "reading", "type": "string", "doc": "A number as the gauge prints it (or does not)."},
    ],
}
SLOPE, INTERCEPT = 2.0, 1.0


def test_a_string_where_the_model_wants_a_number_is_predicted_when_it_parses_and_dead_lettered_when_not(
    stack: Servers, tmp_path: Path
) -> None:
    schema_path = tmp_path / "gauge_reading.avsc"
    schema_path.write_text(json.dumps(GAUGE_SCHEMA))
    model_path = make_affine_model(tmp_path / "affine.onnx", SLOPE, INTERCEPT)
    pipe = Pipeline(
        stack.bootstrap_servers,
        stack.redis_url,
        tmp_path,
        model_path,
        partitions=2,
        overrides={
            "input": {
                "schema": str(schema_path),
                "key_field": "gauge_id",
                "event_id_field": "reading_id",
                "event_time_field": None,
            },
            "features": [{"name": "reading", "source": "event", "field": "reading", "dtype": "float32"}],
            "model": {"name": "gauge", "score_output": "score", "score_column": None, "label_output": None},
        },
    )
    pipe.create_topics()
    s, bootstrap = pipe.settings, pipe.bootstrap
    records = Records(schema_path, "gauge_id", "reading_id")
    rng = np.random.default_rng(61)

    def gauge(text: str, stage: str | None = None, reason: str = "") -> Pill:
        reading = {"reading_id": str(uuid.uuid4()), "gauge_id": f"g-{rng.integers(20)}", "reading": text}
        return records.reading(reading, stage, reason)

    numbers = [f"{value:.3f}" for value in rng.normal(50, 20, 200)]
    normal = [gauge(text) for text in numbers]
    odd_numbers = [gauge(text) for text in ("12.5", "-3", " 7 ", "1e3", "-0", "0.1", "+4.25")]
    bad = [
        gauge("3.4e38", "infer", "non-finite score"),  # fits float32; 2 * 3.4e38 + 1 does not
        gauge("abc", "features", "cannot parse 'abc' as float32"),
        gauge("", "features", "cannot parse '' as float32"),
        gauge("12,5", "features", "cannot parse '12,5' as float32"),
        gauge("nan", "features", "is not a finite number"),
        gauge("inf", "features", "is not a finite number"),
        gauge("-Infinity", "features", "is not a finite number"),
        gauge("1e39", "features", "is out of float32 range"),
    ]
    phase = interleave(normal[:150], odd_numbers + bad)
    records.produce(bootstrap, s.input.topic, phase)

    worker = WorkerProcess(pipe.path, tmp_path, unique("w-gauge"))
    wait_lag_zero(bootstrap, s.kafka.group_id, s.input.topic, worker)
    worker.assert_alive()
    assert worker.stop() == 0, worker.log_tail()
    restarted = WorkerProcess(pipe.path, tmp_path, unique("w-gauge-again"))
    records.produce(bootstrap, s.input.topic, normal[150:])
    wait_lag_zero(bootstrap, s.kafka.group_id, s.input.topic, restarted)
    restarted.assert_alive()
    result = outcome(bootstrap, s, records)
    assert restarted.stop() == 0, restarted.log_tail()

    everything = phase + normal[150:]
    assert_each_in_one_place(result, everything)
    predicted = [p for p in everything if p.stage is None and p.reading is not None]
    inputs = np.array([[float(p.reading["reading"])] for p in predicted if p.reading], dtype=np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["score"], {"X": inputs})
    got = [result.predicted[p.ident][0] for p in predicted]
    np.testing.assert_array_equal([g["score"] for g in got], expected[:, 0].astype(np.float64))
    assert [g["key"] for g in got] == [p.key.decode() for p in predicted if p.key]
    assert_dead_letters(result, everything, s.input.topic)


# --- the reason given for an unknown enum symbol ----------------------------------------------------------------


def test_an_unknown_enum_symbol_is_dead_lettered_with_a_reason_naming_the_enum(
    example: MaintenancePipeline, machines: Machines, tmp_path: Path
) -> None:
    s, bootstrap = example.settings, example.bootstrap
    records = Records(s.input.schema_path, "machine_id", "reading_id")
    normal = [records.reading(r) for r in make_readings(machines, 40, seed=71)]
    assert normal[0].reading is not None
    turbo = Pill("poison-turbo", b"poison-turbo", unknown_enum_symbol(records, normal[0].reading), "decode")
    records.produce(bootstrap, s.input.topic, interleave(normal, [turbo]))
    worker = WorkerProcess(example.path, tmp_path, unique("w-enum"))
    wait_lag_zero(bootstrap, s.kafka.group_id, s.input.topic, worker)
    result = outcome(bootstrap, s, records)
    assert worker.stop() == 0, worker.log_tail()
    assert_each_in_one_place(result, [*normal, turbo])

    (dead,) = result.dead["poison-turbo"]
    reason = headers_of(dead)[HEADER_ERROR_MESSAGE].decode()
    assert headers_of(dead)[HEADER_STAGE] == b"decode"
    # The operator must learn that an enum symbol is unknown (and which enum), not a Python IndexError.
    assert "enum" in reason.lower(), f"the reason does not say an enum symbol is unknown: {reason!r}"
    assert "OperatingMode" in reason or "mode" in reason, f"the reason does not name the enum: {reason!r}"
