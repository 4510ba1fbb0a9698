"""Operator side of the control plane: announce (validated, signed), roll back, read the fleet's status."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Producer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.control.announcements import Action, ModelAnnouncement, WorkerStatus
from streamserve.control.contract import check_score_contract
from streamserve.control.fetch import fetch, redact, sha256_hex
from streamserve.control.reading import ControlLog, latest_statuses, read_keyed_records, read_records
from streamserve.control.registry import ModelLoader
from streamserve.control.rollout import (
    AcceptancePolicy,
    ArtifactRef,
    RolloutState,
    digest_problem,
    uri_scheme,
)
from streamserve.control.signing import sign
from streamserve.errors import DecodeError, ModelError, StreamServeError

logger = logging.getLogger(__name__)
LibrdkafkaConfig = dict[str, str | int | float | bool]
Validator = Callable[[ArtifactRef, ArtifactRef | None], object]
"""Loads a candidate artifact as a worker would (digest, onnxruntime, feature-spec signature, warm-up) and checks
its score contract against the live version (None: nothing to compare with); raises if it cannot serve."""


def local_validator(
    model: ModelSettings, features: Sequence[FeatureSpec], report: Callable[[str], None] = print
) -> Validator:
    """Loads a candidate as a worker does (digest, onnxruntime, the feature spec's signature, a warm-up batch), and
    the live version beside it to check the score contract as the workers' swap will."""
    loader = ModelLoader(model, features, keep_versions=2)

    def validate(candidate: ArtifactRef, live: ArtifactRef | None) -> None:
        new = loader.load(candidate.version, candidate.uri, candidate.sha256)
        compared = ""
        if live is not None and live.version != candidate.version:
            try:
                current = loader.load(live.version, live.uri, live.sha256)
            except ModelError as exc:
                report(
                    f"could not load the live version {live.version} here to compare the score contract ({exc}); "
                    "the workers will compare it"
                )
            else:
                check_score_contract(model, current, new)
                compared = f", keeps the score contract of {live.version}"
        report(f"validated {model.name} {candidate.version}: loads, fits the feature spec, warms up{compared}")

    return validate


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


def control_log(config: LibrdkafkaConfig, topic: str, policy: AcceptancePolicy) -> ControlLog:
    """The model's control topic as every worker reads it; records that do not verify are reported and ignored."""
    log = ControlLog.replay(read_records(config, topic), policy)
    if log.rejected:
        last = log.rejected[-1]
        logger.warning(
            "%d record(s) on %s for model %s did not verify and are ignored (the workers rejected them too); "
            "the last: generation %s: %s",
            len(log.rejected),
            topic,
            policy.model,
            last.generation,
            last.reason,
        )
    return log


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
    profile: tuple[str, str] | None = None,
) -> ModelAnnouncement:
    """Validate a version locally (when given a validator), then announce it with the next generation.

    The digest is computed from the artifact when not given. ``config_model`` is the version of the
    workers' config: recorded as the baseline of the first announcement so it can be rolled back to, and the
    live version the candidate's score contract is checked against until an announcement was accepted.
    ``write=False`` does everything but the write and returns the announcement (checked as the workers will
    check it) for send() at a chosen moment; it must be the next write to the control topic. ``profile``: the
    version's reference profile (URI, sha256), covered by the signature (control/reference.py writes it).
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
    log = control_log(config, topic, policy)
    desired = log.state.desired
    live = desired.live if desired is not None and desired.live is not None else config_model
    if validate is not None:
        try:
            validate(ArtifactRef(version, uri, sha256), live)
        except Exception as exc:
            raise StreamServeError(
                f"{policy.model} {version} ({redact(uri)}) failed local validation, not announced: "
                f"{type(exc).__name__}: {exc} (--no-validate skips this check; workers still validate)"
            ) from exc
    announcement = plan_publish(
        log,
        policy,
        sign_key,
        config_model,
        version=version,
        uri=uri,
        sha256=sha256,
        action=action,
        canary_share=canary_share if action == "canary" else 0.0,
        notes=notes,
        **({"profile_uri": profile[0], "profile_sha256": profile[1]} if profile else {}),
    )
    if write:
        send(config, topic, announcement)
    return announcement


def plan_publish(
    log: ControlLog,
    policy: AcceptancePolicy,
    sign_key: Ed25519PrivateKey | None,
    config_model: ArtifactRef | None,
    **fields: Any,
) -> ModelAnnouncement:
    """The announcement that follows the accepted state: the next generation, the live version as baseline."""
    desired = log.state.desired
    baseline = desired.live if desired is not None else config_model
    return _announcement(
        policy,
        log.state.generation + 1,
        sign_key,
        model=policy.model,
        baseline_version=baseline.version if baseline else None,
        baseline_uri=baseline.uri if baseline else None,
        baseline_sha256=baseline.sha256 if baseline else None,
        **fields,
    )


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
    announcement = plan_rollback(control_log(config, topic, policy), policy, to_version, notes, sign_key)
    send(config, topic, announcement)
    return announcement


def plan_rollback(
    log: ControlLog,
    policy: AcceptancePolicy,
    to_version: str | None = None,
    notes: str | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> ModelAnnouncement:
    """The rollback announcement that follows the accepted state (see rollback)."""
    desired = log.state.desired
    if desired is None:
        raise StreamServeError(f"nothing was accepted for model {policy.model!r}: nothing to roll back")
    target = _rollback_target(log, to_version, policy.model)
    current = desired.candidate or desired.live
    return _announcement(
        policy,
        log.state.generation + 1,
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
        profile_uri=target.profile_uri,  # the version goes back with its profile (None: as before profiles)
        profile_sha256=target.profile_sha256,
    )


def _baseline(announcement: ModelAnnouncement) -> ArtifactRef | None:
    a = announcement
    if a.baseline_version and a.baseline_uri and a.baseline_sha256:
        return ArtifactRef(a.baseline_version, a.baseline_uri, a.baseline_sha256)
    return None


def _rollback_target(log: ControlLog, to_version: str | None, model: str) -> ArtifactRef:
    desired = log.state.desired
    assert desired is not None  # checked by the caller
    if to_version is not None:
        known: dict[str, ArtifactRef] = {}
        for announcement in log.accepted:  # versions and the baselines they recorded (the config's version, first)
            baseline = _baseline(announcement)
            if baseline is not None:
                known.setdefault(baseline.version, baseline)
            a = announcement
            known[a.version] = ArtifactRef(a.version, a.uri, a.sha256, a.profile_uri, a.profile_sha256)
        if to_version not in known:
            raise StreamServeError(f"version {to_version!r} of {model} was never accepted; publish it instead")
        return known[to_version]
    target: ArtifactRef | None
    if desired.mode != "deploy":
        target = desired.live
    else:
        earlier = [past.live for past in log.state.history[:-1] if past.live != desired.live]
        target = earlier[-1] if earlier else _baseline(log.accepted[-1])
    if target is None:
        raise StreamServeError(
            f"{model} has no previous version on the control topic (the workers' config version is not "
            "recorded); use --to VERSION or publish it"
        )
    return target


def fleet_status(config: LibrdkafkaConfig, status_topic: str, timeout_s: float = 20.0) -> list[WorkerStatus]:
    """The latest status of every worker and model on the status topic (records that are no status skipped)."""
    statuses, _ = latest_statuses(read_keyed_records(config, status_topic, timeout_s))
    return statuses
