"""Reference profiles in the control plane, no servers: announcements carry them signed (old records and old
signatures still hold), the loader verifies them with the model, `--reference` reads Parquet and CSV."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamserve.config import ModelSettings
from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.fetch import sha256_hex
from streamserve.control.publish import plan_publish, plan_rollback
from streamserve.control.reading import ControlLog
from streamserve.control.reference import read_sample, served_columns, write_profile
from streamserve.control.registry import ModelLoader
from streamserve.control.rollout import AcceptancePolicy, RolloutState
from streamserve.control.signing import TrustedKeys, sign
from streamserve.errors import ConfigError, DigestMismatch
from streamserve.pipeline.profile import ReferenceProfile
from streamserve.schemas import bundled
from tests.unit.test_process import FEATURES, strict_model

KEY = Ed25519PrivateKey.generate()
POLICY = AcceptancePolicy("tickets", TrustedKeys({}).with_key(KEY.public_key()), require_signatures=True)
MODEL = ModelSettings(name="tickets", uri="m.onnx")


def announcement(**extra: object) -> ModelAnnouncement:
    plain = ModelAnnouncement(
        model="tickets", version="v2", uri="/m/v2.onnx", sha256="a" * 64, action="deploy", generation=1,
        announced_at=1_700_000_000_000, announced_by="t@h",
    )  # fmt: skip
    return sign(replace(plain, **extra), KEY)  # type: ignore[arg-type]


def test_an_announcement_without_a_profile_is_written_and_signed_as_before() -> None:
    a = announcement()
    old_writer = io.BytesIO()  # what a worker of the previous release writes and reads: version 1 of the schema
    record = {k: v for k, v in a.__dict__.items() if not k.startswith("profile")}
    fastavro.schemaless_writer(old_writer, bundled("model_announcement"), record)
    assert a.encode() == old_writer.getvalue()
    assert ModelAnnouncement.decode(old_writer.getvalue()) == a
    body = json.loads(a.canonical().split(b"\n", 1)[1])
    assert "profile_uri" not in body
    assert "profile_sha256" not in body
    assert POLICY.trusted.check(a) is None


def test_a_profile_is_covered_by_the_signature_and_survives_the_topic() -> None:
    a = announcement(profile_uri="/m/v2.onnx.profile.json", profile_sha256="b" * 64)
    assert ModelAnnouncement.decode(a.encode()) == a
    state, rejection = RolloutState().offer(a, POLICY)
    assert rejection is None
    assert state.desired is not None
    assert state.desired.live is not None
    assert state.desired.live.profile_sha256 == "b" * 64
    forged = replace(a, profile_sha256="c" * 64)
    assert "bad signature" in (POLICY.trusted.check(forged) or "")
    _, rejection = RolloutState().offer(announcement(profile_uri="/p.json", profile_sha256="nothex"), POLICY)
    assert rejection is not None
    assert "profile" in rejection.reason


def test_garbage_on_the_control_topic_is_a_decode_error_for_both_schemas() -> None:
    _, rejection = RolloutState().offer_record(b"\x02\x00garbage", POLICY)
    assert rejection is not None


def sample(rows: int = 400) -> pa.Table:
    rng = np.random.default_rng(7)
    queues = rng.choice(["billing", "tech"], rows).tolist()
    waits = rng.gamma(2.0, 30.0, rows).tolist()
    queues[3], waits[5] = None, None  # missing cells
    return pa.table({"queue": queues, "wait_s": waits})


def test_the_profile_is_verified_with_the_model_and_a_tampered_one_rejected(tmp_path: Path) -> None:
    artifact = tmp_path / "tickets-v2.onnx"
    artifact.write_bytes(strict_model())
    pq.write_table(sample(), tmp_path / "ref.parquet")
    uri, digest, profile = write_profile(tmp_path / "ref.parquet", MODEL, FEATURES, "v2", str(artifact))
    assert uri == f"{artifact}.profile.json"
    loader = ModelLoader(MODEL, FEATURES)
    model = loader.load("v2", str(artifact), sha256_hex(strict_model()), uri, digest)
    assert model.profile == profile
    assert model.profile_sha256 == digest
    assert profile.score is not None
    assert profile.rows == 400
    tampered = Path(uri).read_bytes().replace(b'"rows":400', b'"rows":401')
    Path(uri).write_bytes(tampered)
    with pytest.raises(DigestMismatch, match="sha256 mismatch"):
        ModelLoader(MODEL, FEATURES).load("v2", str(artifact), sha256_hex(strict_model()), uri, digest)


def test_csv_and_parquet_samples_give_the_same_columns(tmp_path: Path) -> None:
    table = sample()
    pq.write_table(table, tmp_path / "ref.parquet")
    pacsv.write_csv(table, tmp_path / "ref.csv")
    parquet = served_columns(read_sample(tmp_path / "ref.parquet"), FEATURES)
    csv = served_columns(read_sample(tmp_path / "ref.csv"), FEATURES)
    assert parquet["queue"].tolist() == csv["queue"].tolist()
    np.testing.assert_array_equal(parquet["wait_s"], csv["wait_s"])
    assert parquet["queue"][3] is None
    assert np.isnan(parquet["wait_s"][5])
    with pytest.raises(ConfigError, match="no column for features"):
        served_columns(pa.table({"queue": ["tech"]}), FEATURES)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read the reference sample"):
        read_sample(tmp_path / "bad.parquet")
    assert ReferenceProfile.from_bytes(
        write_profile(tmp_path / "ref.csv", MODEL, FEATURES, "v2", str(_artifact(tmp_path)))[2].to_bytes()
    ).rows == len(table)


def _artifact(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(strict_model())
    return path


def test_a_rollback_takes_the_versions_profile_along() -> None:
    records: list[bytes | None] = []
    for version, profile in (("v1", ("/m/v1.onnx.profile.json", "1" * 64)), ("v2", None)):
        log = ControlLog.replay(records, POLICY)
        extra = {"profile_uri": profile[0], "profile_sha256": profile[1]} if profile else {}
        planned = plan_publish(log, POLICY, KEY, None, version=version, uri=f"/m/{version}.onnx",
                               sha256=version[1] * 64, action="deploy", notes=None, **extra)  # fmt: skip
        records.append(planned.encode())
    back = plan_rollback(ControlLog.replay(records, POLICY), POLICY, sign_key=KEY)
    assert (back.version, back.profile_uri, back.profile_sha256) == ("v1", "/m/v1.onnx.profile.json", "1" * 64)
    state, rejection = ControlLog.replay(records, POLICY).state.offer(back, POLICY)
    assert rejection is None
    assert state.desired is not None
    assert state.desired.live is not None
    assert state.desired.live.profile_sha256 == "1" * 64
