"""Whatever anyone writes to the control or status topic, a legitimate publish, rollback and status still work.

Records are arbitrary bytes and arbitrary decodable announcements (any generation an Avro long can hold, any
timestamp, forged or garbage signatures, other models), under a policy that requires signatures and one that
does not. The publisher's plan is then replayed with the records exactly as a worker replays the topic.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.publish import plan_publish, plan_rollback
from streamserve.control.reading import ControlLog, latest_statuses
from streamserve.control.rollout import AcceptancePolicy, replay
from streamserve.control.signing import TrustedKeys, sign
from streamserve.errors import StreamServeError

KEY = Ed25519PrivateKey.generate()
ATTACKER = Ed25519PrivateKey.generate()
TRUSTED = TrustedKeys({}).with_key(KEY.public_key())
POLICIES = {
    "signed": AcceptancePolicy("fraud", TRUSTED, require_signatures=True),
    "unsigned": AcceptancePolicy("fraud"),
}
LEGIT = hashlib.sha256(b"legit").hexdigest()
LONGS = st.integers(-(2**63), 2**63 - 1)
DIGESTS = st.sampled_from([hashlib.sha256(b"v1").hexdigest(), ""]) | st.text(max_size=70)
URIS = st.sampled_from(["/models/v1.onnx", "http://models.local/v1.onnx", "s3://bucket/v1.onnx"]) | st.text(max_size=30)


@st.composite
def announcements(draw: st.DrawFn) -> ModelAnnouncement:
    """Any announcement the schema can carry, signed by the trusted key, an attacker's, garbage or nothing."""
    plain = ModelAnnouncement(
        model=draw(st.sampled_from(["fraud", "other"]) | st.text(max_size=10)),
        version=draw(st.text(max_size=12)),
        uri=draw(URIS),
        sha256=draw(DIGESTS),
        action=draw(st.sampled_from(["deploy", "canary", "shadow", "rollback"])),
        canary_share=draw(st.floats(allow_nan=True, allow_infinity=True)),
        baseline_version=draw(st.none() | st.text(max_size=12)),
        baseline_uri=draw(st.none() | URIS),
        baseline_sha256=draw(st.none() | DIGESTS),
        announced_at=draw(LONGS),
        announced_by=draw(st.text(max_size=12)),
        notes=draw(st.none() | st.text(max_size=12)),
        generation=draw(
            st.sampled_from([2**63 - 1, 2**62, -1, 0, 1, 2, 1_000_000, 1_000_001]) | LONGS | st.integers(0, 40)
        ),
    )
    signer = draw(st.sampled_from(["trusted", "attacker", "garbage", "none"]))
    if signer == "trusted":
        return sign(plain, KEY)
    if signer == "attacker":
        return sign(plain, ATTACKER)
    if signer == "garbage":
        return replace(plain, key_id=draw(st.text(max_size=20)), signature=draw(st.binary(max_size=80)))
    return plain


def _encoded(announcement: ModelAnnouncement) -> bytes:
    return announcement.encode()


RECORDS = st.lists(
    st.none()
    | st.binary(max_size=120)
    | announcements().map(_encoded)
    | announcements().map(_encoded).map(lambda b: b[: len(b) // 2]),
    max_size=12,
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@PROPERTY
@given(records=RECORDS)
def test_a_legitimate_publish_follows_whatever_the_topic_holds(policy_name: str, records: list[bytes | None]) -> None:
    policy = POLICIES[policy_name]
    log = ControlLog.replay(records, policy)
    planned = plan_publish(
        log, policy, KEY, None, version="legit", uri="/models/legit.onnx", sha256=LEGIT, action="deploy", notes=None
    )
    state = replay([*records, planned.encode()], policy)
    assert state.desired is not None
    assert (state.generation, state.desired.version) == (planned.generation, "legit"), "the workers accept it"
    assert planned.generation == log.state.generation + 1


@pytest.mark.parametrize("policy_name", sorted(POLICIES))
@PROPERTY
@given(records=RECORDS, to_version=st.none() | st.text(max_size=12))
def test_a_rollback_follows_or_refuses_in_one_line(
    policy_name: str, records: list[bytes | None], to_version: str | None
) -> None:
    policy = POLICIES[policy_name]
    log = ControlLog.replay(records, policy)
    try:
        planned = plan_rollback(log, policy, to_version, sign_key=KEY)
    except StreamServeError as exc:
        refusal = str(exc)
        planned = None
    if planned is None:
        assert "\n" not in refusal
        assert log.state.desired is None or to_version is not None or "no previous version" in refusal
        return
    state = replay([*records, planned.encode()], policy)
    assert state.desired is not None
    assert (state.generation, state.desired.version) == (planned.generation, planned.version)


@PROPERTY
@given(records=st.lists(st.tuples(st.none() | st.binary(max_size=20), st.none() | st.binary(max_size=200))))
def test_status_reading_skips_what_is_no_status(records: list[tuple[bytes | None, bytes | None]]) -> None:
    statuses, unreadable = latest_statuses(records)
    assert len(statuses) + unreadable <= len(records)
