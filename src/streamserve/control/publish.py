"""Operator side of the control plane: announce, roll back, and read the fleet's status."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, Producer

from streamserve.control.announcements import Action, ModelAnnouncement, WorkerStatus
from streamserve.control.fetch import fetch, sha256_hex
from streamserve.control.follower import read_topic_to_end
from streamserve.errors import ModelError, StreamServeError

LibrdkafkaConfig = dict[str, str | int | float | bool]


def _reader(config: LibrdkafkaConfig) -> Consumer:
    return Consumer({**config, "group.id": f"streamserve-cli-{uuid.uuid4()}", "enable.auto.commit": False})


def read_announcements(config: LibrdkafkaConfig, topic: str, timeout_s: float = 20.0) -> list[ModelAnnouncement]:
    """Every announcement still on the control topic, oldest first."""
    consumer = _reader(config)
    found: list[ModelAnnouncement] = []
    try:
        read_topic_to_end(
            consumer,
            topic,
            timeout_s,
            lambda key, value: found.append(ModelAnnouncement.decode(value)) if value else None,
        )
    finally:
        consumer.close()
    return sorted(found, key=lambda a: a.announced_at)


def current(config: LibrdkafkaConfig, topic: str, model: str) -> ModelAnnouncement | None:
    """The latest announcement for a model."""
    history = [a for a in read_announcements(config, topic) if a.model == model]
    return history[-1] if history else None


def send(config: LibrdkafkaConfig, topic: str, announcement: ModelAnnouncement, timeout_s: float = 30.0) -> None:
    """Write an announcement keyed by model name and wait for the broker's acknowledgement."""
    errors: list[str] = []
    producer = Producer({**config, "enable.idempotence": True})
    producer.produce(
        topic,
        announcement.encode(),
        announcement.model.encode(),
        on_delivery=lambda err, msg: errors.append(str(err)) if err else None,
    )
    if producer.flush(timeout_s) or errors:
        raise StreamServeError(f"announcement not acknowledged by the broker: {errors or 'timeout'}")


def publish(
    config: LibrdkafkaConfig,
    topic: str,
    status_topic: str,
    model: str,
    version: str,
    uri: str,
    sha256: str | None = None,
    action: Action = "deploy",
    canary_share: float = 0.0,
    notes: str | None = None,
) -> ModelAnnouncement:
    """Announce a version; the digest is computed from the artifact when not given."""
    if sha256 is None:
        try:
            sha256 = sha256_hex(fetch(uri))
        except ModelError as exc:
            raise StreamServeError(f"{exc}; pass --sha256 when the artifact is not readable from here") from exc
    if action == "canary" and not 0.0 < canary_share < 1.0:
        raise StreamServeError(f"canary share must be between 0 and 1, got {canary_share}")
    live = current(config, topic, model)
    baseline: tuple[str | None, str | None, str | None] = (None, None, None)
    if live is not None and live.action in ("canary", "shadow") and live.baseline_version:
        # The live version under a canary/shadow is its baseline, not the candidate.
        baseline = (live.baseline_version, live.baseline_uri, live.baseline_sha256)
    elif live is not None:
        baseline = (live.version, live.uri, live.sha256)
    else:
        # First announcement: the fleet serves the version of its config; remember it for rollbacks.
        serving = [s for s in fleet_status(config, status_topic) if s.model == model and s.serving_uri]
        if serving:
            newest = max(serving, key=lambda s: s.reported_at)
            baseline = (newest.serving_version, newest.serving_uri, newest.serving_sha256)
    announcement = ModelAnnouncement.now(
        model=model,
        version=version,
        uri=uri,
        sha256=sha256,
        action=action,
        canary_share=canary_share,
        baseline_version=baseline[0],
        baseline_uri=baseline[1],
        baseline_sha256=baseline[2],
        notes=notes,
    )
    send(config, topic, announcement)
    return announcement


def rollback(
    config: LibrdkafkaConfig, topic: str, model: str, to_version: str | None = None, notes: str | None = None
) -> ModelAnnouncement:
    """Return to the version before the current one (or to a named earlier version)."""
    history = [a for a in read_announcements(config, topic) if a.model == model]
    if not history:
        raise StreamServeError(f"nothing was announced for model {model!r}: nothing to roll back")
    latest = history[-1]
    known = {a.version: (a.uri, a.sha256) for a in history}
    known.update(
        {a.baseline_version: (a.baseline_uri or "", a.baseline_sha256 or "") for a in history if a.baseline_version}
    )
    target = to_version or latest.baseline_version
    if target is None:
        raise StreamServeError(f"{model} {latest.version} has no previous version; use --to VERSION")
    if target not in known:
        raise StreamServeError(f"version {target!r} of {model} is not on the control topic; publish it instead")
    uri, sha256 = known[target]
    announcement = ModelAnnouncement.now(
        model=model,
        version=target,
        uri=uri,
        sha256=sha256,
        action="rollback",
        baseline_version=latest.version,
        baseline_uri=latest.uri,
        baseline_sha256=latest.sha256,
        notes=notes,
    )
    send(config, topic, announcement)
    return announcement


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
