"""The rollout state machine over sequences of announcements: no servers, no clock."""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.fetch import redact
from streamserve.control.rollout import AcceptancePolicy, ArtifactRef, RolloutState, replay
from streamserve.control.signing import TrustedKeys, sign

DIGEST = {v: hashlib.sha256(v.encode()).hexdigest() for v in ["v1", "v2", "v3", "v4"]}
KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
SIGNED = AcceptancePolicy("fraud", TrustedKeys({}).with_key(KEY.public_key()), require_signatures=True)


def ref(version: str) -> ArtifactRef:
    return ArtifactRef(version, f"/models/{version}.onnx", DIGEST[version])


def announce(
    generation: int,
    version: str,
    action: str = "deploy",
    baseline: str | None = None,
    share: float = 0.0,
    **extra: object,
) -> ModelAnnouncement:
    base = ref(baseline) if baseline else None
    plain = ModelAnnouncement(
        model="fraud",
        version=version,
        uri=f"/models/{version}.onnx",
        sha256=DIGEST[version],
        action=action,  # type: ignore[arg-type]
        canary_share=share,
        baseline_version=base.version if base else None,
        baseline_uri=base.uri if base else None,
        baseline_sha256=base.sha256 if base else None,
        announced_at=1_700_000_000_000 + generation,
        announced_by="test@host",
        generation=generation,
    )
    return sign(replace(plain, **extra), KEY)  # type: ignore[arg-type]


def run(*announcements: ModelAnnouncement, policy: AcceptancePolicy = SIGNED) -> tuple[RolloutState, list[str]]:
    state, reasons = RolloutState(), []
    for a in announcements:
        state, rejection = state.offer(a, policy)
        if rejection is not None:
            reasons.append(rejection.reason)
    return state, reasons


def compact(records: list[ModelAnnouncement]) -> list[ModelAnnouncement]:
    """What Kafka's log cleaner leaves: the last record of each key, in offset order."""
    last = {a.record_key(): i for i, a in enumerate(records)}
    return [a for i, a in enumerate(records) if last[a.record_key()] == i]


def test_deploys_are_accepted_in_generation_order() -> None:
    state, reasons = run(announce(1, "v2", baseline="v1"), announce(2, "v3", baseline="v2"))
    assert reasons == []
    assert state.generation == 2
    assert state.desired is not None
    assert (state.desired.mode, state.desired.live) == ("deploy", ref("v3"))


def test_a_rejected_announcement_changes_nothing() -> None:
    accepted, _ = run(announce(1, "v2"))
    bad = [
        announce(2, "v3").unsigned(),
        sign(announce(2, "v3").unsigned(), OTHER_KEY),
        replace(announce(2, "v3"), version="v4"),
        announce(1, "v3"),
        announce(2, "v3", sha256=""),
        announce(2, "v3", sha256="xyz"),
        announce(2, "v3", sha256=DIGEST["v3"].upper()),
        announce(2, "v3", uri="s3://bucket/v3.onnx"),
        announce(2, "v3", action="canary", share=1.5),
        announce(2, "v3", action="canary", baseline="v1", baseline_sha256=""),
    ]
    for record in bad:
        state, rejection = accepted.offer(record, SIGNED)
        assert rejection is not None, record
        assert state is accepted, f"{rejection.reason} changed the state"


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (announce(2, "v3").unsigned(), "unsigned announcement"),
        (sign(announce(2, "v3").unsigned(), OTHER_KEY), "signed by untrusted key"),
        (replace(announce(2, "v3"), notes="changed after signing"), "bad signature"),
        (announce(1, "v3"), "generation 1 is not above the accepted generation 1"),
        (announce(2, "v3", sha256=""), "empty sha256"),
        (announce(2, "v3", sha256="abc"), "malformed sha256"),
        (announce(2, "v3", uri="ftp://host/v3.onnx"), "scheme 'ftp' is not allowed"),
    ],
)
def test_rejections_say_why(record: ModelAnnouncement, reason: str) -> None:
    state, reasons = run(announce(1, "v2"), record)
    assert state.generation == 1
    assert len(reasons) == 1
    assert reason in reasons[0]


@pytest.mark.parametrize("name", [f.name for f in fields(ModelAnnouncement) if f.name not in ("signature", "key_id")])
def test_changing_any_field_after_signing_is_detected(name: str) -> None:
    original = announce(3, "v2", action="canary", baseline="v1", share=0.25, notes="n")
    value = getattr(original, name)
    changed = {
        str: lambda v: v + "x",
        int: lambda v: v + 1,
        float: lambda v: v / 2,
    }.get(type(value), lambda v: "shadow")(value)
    if name == "action":
        changed = "shadow"
    tampered = replace(original, **{name: changed})
    assert SIGNED.trusted.check(original) is None
    assert "bad signature" in (SIGNED.trusted.check(tampered) or "")


def test_replays_of_older_or_equal_generations_are_rejected() -> None:
    first, second = announce(1, "v2"), announce(2, "v3")
    state, reasons = run(first, second, first, second)
    assert state.desired is not None
    assert state.desired.live == ref("v3")
    assert len(reasons) == 2
    assert all("replayed or stale" in r for r in reasons)


def test_rollback_is_a_deploy_of_an_earlier_version() -> None:
    state, _ = run(announce(1, "v2", baseline="v1"), announce(2, "v1", action="rollback", baseline="v2"))
    assert state.desired is not None
    assert (state.desired.mode, state.desired.live, state.desired.candidate) == ("deploy", ref("v1"), None)


def test_canary_and_shadow_keep_the_live_version_beside_the_candidate() -> None:
    state, _ = run(announce(1, "v2"), announce(2, "v3", action="canary", baseline="v2", share=0.1))
    assert state.desired is not None
    assert (state.desired.mode, state.desired.live, state.desired.candidate) == ("canary", ref("v2"), ref("v3"))
    assert state.desired.canary_share == 0.1
    # Without a recorded baseline, the live version is the one of the previous accepted state.
    state, _ = run(announce(1, "v2"), announce(2, "v3", action="shadow"))
    assert state.desired is not None
    assert (state.desired.mode, state.desired.live, state.desired.canary_share) == ("shadow", ref("v2"), 0.0)
    # With nothing before, it is the workers' config version (None).
    state, _ = run(announce(1, "v3", action="shadow"))
    assert state.desired is not None
    assert state.desired.live is None


SEQUENCE = [
    announce(1, "v2", baseline="v1"),
    announce(2, "v3", sha256="0" * 63),  # malformed digest: rejected
    announce(2, "v3", action="canary", baseline="v2", share=0.2),
    sign(announce(3, "v4").unsigned(), OTHER_KEY),  # forged
    announce(3, "v3", action="shadow", baseline="v2"),
    announce(1, "v1"),  # replayed older generation
    announce(4, "v2", action="rollback", baseline="v3"),
    announce(5, "v4").unsigned(),  # unsigned
]


def test_a_restarted_worker_replaying_the_topic_reaches_the_live_workers_state() -> None:
    live = RolloutState()
    for i, record in enumerate(SEQUENCE):
        live, _ = live.offer(record, SIGNED)
        restarted = replay([r.encode() for r in SEQUENCE[: i + 1]], SIGNED)
        assert restarted == live, f"after record {i}"
    assert live.desired is not None
    assert (live.generation, live.desired.live) == (4, ref("v2"))


def test_compaction_never_changes_the_desired_state() -> None:
    duplicated = [SEQUENCE[0], *SEQUENCE, SEQUENCE[2], SEQUENCE[-1]]  # retried sends and replays
    compacted = compact(duplicated)
    assert len(compacted) < len(duplicated)
    whole = replay([r.encode() for r in duplicated], SIGNED)
    assert replay([r.encode() for r in compacted], SIGNED).desired == whole.desired
    # A rejected record never shares a key with an accepted one, so it cannot compact it away.
    forged_same_generation = sign(announce(4, "v4").unsigned(), OTHER_KEY)
    assert forged_same_generation.record_key() != SEQUENCE[6].record_key()
    after = replay([r.encode() for r in compact([*duplicated, forged_same_generation])], SIGNED)
    assert after.desired == whole.desired


def test_key_rotation_trusts_several_keys_and_retires_the_old_one() -> None:
    new_key = Ed25519PrivateKey.generate()
    both = replace(SIGNED, trusted=SIGNED.trusted.with_key(new_key.public_key()))
    old_signed = announce(1, "v2")
    new_signed = sign(announce(2, "v3").unsigned(), new_key)
    state, reasons = run(old_signed, new_signed, policy=both)
    assert reasons == []
    assert state.desired is not None
    assert state.desired.live == ref("v3")
    only_new = replace(SIGNED, trusted=TrustedKeys({}).with_key(new_key.public_key()))
    state, reasons = run(old_signed, new_signed, policy=only_new)
    assert state.desired is not None
    assert state.desired.live == ref("v3")
    assert len(reasons) == 1
    assert "untrusted key" in reasons[0]


def test_without_trusted_keys_unsigned_announcements_are_accepted_but_digests_still_checked() -> None:
    open_policy = AcceptancePolicy("fraud")
    state, reasons = run(announce(1, "v2").unsigned(), announce(2, "v3", sha256="").unsigned(), policy=open_policy)
    assert state.desired is not None
    assert state.desired.live == ref("v2")
    assert len(reasons) == 1
    assert "empty sha256" in reasons[0]


def test_other_models_tombstones_and_garbage() -> None:
    state = RolloutState()
    other = replace(announce(1, "v2").unsigned(), model="churn")
    for value in (None, b"", other.encode()):
        assert state.offer_record(value, SIGNED) == (state, None)
    after, rejection = state.offer_record(b"\xff\x00garbage", SIGNED)
    assert after is state
    assert rejection is not None
    assert "not a model announcement" in rejection.reason


def test_artifact_uris_are_redacted() -> None:
    assert redact("https://user:pw@bucket.example.com:8443/m/v2.onnx?X-Amz-Signature=abc#f") == (
        "https://***@bucket.example.com:8443/m/v2.onnx?***"
    )
    assert redact("/models/v2.onnx") == "/models/v2.onnx"
    assert redact("file:///models/v2.onnx") == "file:///models/v2.onnx"


UNSIGNED = AcceptancePolicy("fraud")


@pytest.mark.parametrize(
    ("generation", "reason"),
    [
        (2**63 - 1, "more than 1,000,000 above the accepted generation 1"),
        (2**62, "more than 1,000,000 above the accepted generation 1"),
        (1_000_002, "more than 1,000,000 above the accepted generation 1"),
        (-1, "not above the accepted generation 1"),
        (2**64, "does not fit an Avro long"),
    ],
)
def test_a_generation_far_above_the_accepted_one_is_rejected(generation: int, reason: str) -> None:
    # Unsigned records are accepted under this policy: only the bound stands between them and the generations.
    state, reasons = run(announce(1, "v1"), replace(announce(2, "v2"), generation=generation), policy=UNSIGNED)
    assert state.generation == 1
    assert len(reasons) == 1
    assert reasons[0].startswith(f"generation {generation} ")
    assert reason in reasons[0]
    later, more = run(announce(1, "v1"), announce(2, "v2"), policy=UNSIGNED)
    assert (later.generation, more) == (2, []), "the next legitimate generation is still free"


def test_the_generation_step_is_configurable_and_inclusive() -> None:
    policy = replace(UNSIGNED, max_generation_step=10)
    state, reasons = run(announce(1, "v1"), announce(11, "v2"), announce(22, "v3"), policy=policy)
    assert state.generation == 11
    assert len(reasons) == 1
    assert "more than 10 above the accepted generation 11" in reasons[0]
