"""Operator side of the control plane: announce (validated, signed), roll back, read the fleet's status."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Producer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamserve.control.announcements import Action, ModelAnnouncement, WorkerStatus
from streamserve.control.fetch import fetch, redact, sha256_hex
from streamserve.control.follower import read_topic_to_end
from streamserve.control.rollout import (
    AcceptancePolicy,
    ArtifactRef,
    RolloutState,
    digest_problem,
    uri_scheme,
)
from streamserve.control.signing import sign
from streamserve.errors import DecodeError, ModelError, StreamServeError

LibrdkafkaConfig = dict[str, str | int | float | bool]
Validator = Callable[[ArtifactRef], object]
"""Loads an artifact as a worker would (digest, onnxruntime, feature-spec signature, warm-up); raises if it cannot."""


def _reader(config: LibrdkafkaConfig) -> Consumer:
    return Consumer({**config, "group.id": f"streamserve-cli-{uuid.uuid4()}", "enable.auto.commit": False})


def read_records(config: LibrdkafkaConfig, topic: str, timeout_s: float = 20.0) -> list[bytes | None]:
    """Every record value still on the control topic, in topic order."""
    consumer = _reader(config)
    found: list[bytes | None] = []
    try:
        read_topic_to_end(consumer, topic, timeout_s, lambda key, value: found.append(value))
    finally:
        consumer.close()
    return found


def read_announcements(config: LibrdkafkaConfig, topic: str, timeout_s: float = 20.0) -> list[ModelAnnouncement]:
    """Every decodable announcement on the control topic, in topic order (accepted or not)."""
    found = []
    for value in read_records(config, topic, timeout_s):
        if value:
            try:
                found.append(ModelAnnouncement.decode(value))
            except DecodeError:
                continue
    return found


def accepted_state(
    config: LibrdkafkaConfig, topic: str, policy: AcceptancePolicy
) -> tuple[RolloutState, int, list[ModelAnnouncement]]:
    """The model's state as every worker computes it, the highest generation any record of it claims,
    and the announcements that were accepted, oldest first."""
    state = RolloutState()
    highest = 0
    accepted: list[ModelAnnouncement] = []
    for value in read_records(config, topic):
        if not value:
            continue
        try:
            announcement = ModelAnnouncement.decode(value)
        except DecodeError:
            continue
        if announcement.model != policy.model:
            continue
        highest = max(highest, announcement.generation)
        state, rejection = state.offer(announcement, policy)
        if rejection is None:
            accepted.append(announcement)
    return state, max(highest, state.generation), accepted


def send(config: LibrdkafkaConfig, topic: str, announcement: ModelAnnouncement, timeout_s: float = 30.0) -> None:
    """Write an announcement to the control topic's only partition and wait for the acknowledgement."""
    errors: list[str] = []
    producer = Producer({**config, "enable.idempotence": True})
    producer.produce(
        topic,
        announcement.encode(),
        announcement.record_key(),
        partition=0,  # one partition: every worker sees every model's records in one order
        on_delivery=lambda err, msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s) or errors:
        raise StreamServeError(f"announcement not acknowledged by the broker: {errors or 'timeout'}")


def _check_uri(uri: str, policy: AcceptancePolicy) -> None:
    scheme = uri_scheme(uri)
    if scheme not in policy.allowed_schemes:
        raise StreamServeError(
            f"artifact URI scheme {scheme!r} is not allowed "
            f"(control.allowed_uri_schemes: {sorted(policy.allowed_schemes)})"
        )


def _announcement(
    policy: AcceptancePolicy, generation: int, sign_key: Ed25519PrivateKey | None, **fields: Any
) -> ModelAnnouncement:
    announcement = ModelAnnouncement.now(generation=generation, **fields)
    if sign_key is not None:
        announcement = sign(announcement, sign_key)
    elif policy.require_signatures:
        raise StreamServeError("the workers require signed announcements: pass --sign-key FILE")
    # What the workers will decide, decided here first: a refused announcement is never written.
    _, rejection = RolloutState(generation - 1).offer(announcement, policy)
    if rejection is not None:
        raise StreamServeError(f"the workers would reject this announcement: {rejection.reason}")
    return announcement


def _announce(
    config: LibrdkafkaConfig,
    topic: str,
    policy: AcceptancePolicy,
    generation: int,
    sign_key: Ed25519PrivateKey | None,
    **fields: Any,
) -> ModelAnnouncement:
    announcement = _announcement(policy, generation, sign_key, **fields)
    send(config, topic, announcement)
    return announcement


def publish(
    config: LibrdkafkaConfig,
    topic: str,
    policy: AcceptancePolicy,
    version: str,
    uri: str,
    sha256: str | None = None,
    action: Action = "deploy",
    canary_share: float = 0.0,
    notes: str | None = None,
    sign_key: Ed25519PrivateKey | None = None,
    validate: Validator | None = None,
    config_model: ArtifactRef | None = None,
    write: bool = True,
) -> ModelAnnouncement:
    """Validate a version locally (when given a validator), then announce it with the next generation.

    The digest is computed from the artifact when not given. ``config_model`` is the version of the
    workers' config: recorded as the baseline of the first announcement so it can be rolled back to.
    ``write=False`` does everything but the write and returns the announcement (checked as the workers will
    check it) for send() at a chosen moment; it must be the next write to the control topic.
    """
    _check_uri(uri, policy)
    if sha256 is None:
        try:
            sha256 = sha256_hex(fetch(uri))
        except ModelError as exc:
            raise StreamServeError(f"{exc}; pass --sha256 when the artifact is not readable from here") from exc
    problem = digest_problem(sha256)
    if problem is not None:
        raise StreamServeError(problem)
    if action == "canary" and not 0.0 < canary_share < 1.0:
        raise StreamServeError(f"canary share must be between 0 and 1, got {canary_share}")
    if validate is not None:
        try:
            validate(ArtifactRef(version, uri, sha256))
        except Exception as exc:
            raise StreamServeError(
                f"{policy.model} {version} ({redact(uri)}) failed local validation, not announced: "
                f"{type(exc).__name__}: {exc} (--no-validate skips this check; workers still validate)"
            ) from exc
    state, highest, _ = accepted_state(config, topic, policy)
    desired = state.desired
    baseline = desired.live if desired is not None else config_model
    announcement = _announcement(
        policy,
        highest + 1,
        sign_key,
        model=policy.model,
        version=version,
        uri=uri,
        sha256=sha256,
        action=action,
        canary_share=canary_share if action == "canary" else 0.0,
        baseline_version=baseline.version if baseline else None,
        baseline_uri=baseline.uri if baseline else None,
        baseline_sha256=baseline.sha256 if baseline else None,
        notes=notes,
    )
    if write:
        send(config, topic, announcement)
    return announcement


def rollback(
    config: LibrdkafkaConfig,
    topic: str,
    policy: AcceptancePolicy,
    to_version: str | None = None,
    notes: str | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> ModelAnnouncement:
    """Return to the live version before the current state (or to a named earlier accepted version).

    Under a canary or shadow that is the version beside the candidate (the candidate is dropped).
    """
    state, highest, accepted = accepted_state(config, topic, policy)
    desired = state.desired
    if desired is None:
        raise StreamServeError(f"nothing was accepted for model {policy.model!r}: nothing to roll back")
    known: dict[str, ArtifactRef] = {}
    for announcement in accepted:  # versions and the baselines they recorded (the config's version, first)
        if announcement.baseline_version and announcement.baseline_uri and announcement.baseline_sha256:
            baseline = ArtifactRef(
                announcement.baseline_version, announcement.baseline_uri, announcement.baseline_sha256
            )
            known.setdefault(baseline.version, baseline)
        known[announcement.version] = ArtifactRef(announcement.version, announcement.uri, announcement.sha256)
    target: ArtifactRef | None
    if to_version is not None:
        target = known.get(to_version)
        if target is None:
            raise StreamServeError(f"version {to_version!r} of {policy.model} was never accepted; publish it instead")
    elif desired.mode != "deploy":
        target = desired.live
    else:
        earlier = [past.live for past in state.history[:-1] if past.live != desired.live]
        last = accepted[-1]
        recorded = (
            ArtifactRef(last.baseline_version, last.baseline_uri, last.baseline_sha256)
            if last.baseline_version and last.baseline_uri and last.baseline_sha256
            else None
        )
        target = earlier[-1] if earlier else recorded
    if target is None:
        raise StreamServeError(
            f"{policy.model} has no previous version on the control topic (the workers' config version is not "
            "recorded); use --to VERSION or publish it"
        )
    current = desired.candidate or desired.live
    return _announce(
        config,
        topic,
        policy,
        highest + 1,
        sign_key,
        model=policy.model,
        version=target.version,
        uri=target.uri,
        sha256=target.sha256,
        action="rollback",
        baseline_version=current.version if current else None,
        baseline_uri=current.uri if current else None,
        baseline_sha256=current.sha256 if current else None,
        notes=notes,
    )


def fleet_status(config: LibrdkafkaConfig, status_topic: str, timeout_s: float = 20.0) -> list[WorkerStatus]:
    """The latest status of every worker and model on the status topic."""
    consumer = _reader(config)
    latest: dict[bytes, WorkerStatus] = {}

    def keep(key: bytes | None, value: bytes | None) -> None:
        if key is not None and value:
            latest[key] = WorkerStatus.decode(value)

    try:
        read_topic_to_end(consumer, status_topic, timeout_s, keep)
    finally:
        consumer.close()
    return sorted(latest.values(), key=lambda s: (s.model, s.worker_id))
