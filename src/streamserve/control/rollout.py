"""The rollout state machine: which announcements are accepted, and the desired state they define.

This module is pure (no I/O, no clock): the desired state of a model is a function of the sequence of
control-topic records and the acceptance policy alone. Every worker - running, restarted, started late,
after compaction - and the publisher replay the same records through ``offer`` and reach the same state.

An announcement is *accepted* when it decodes, names this model, carries a signature of a trusted key
(when signatures are required), a well-formed sha256 for every artifact, URIs of allowed schemes, a valid
action/share, and a generation above the last accepted one by at most the policy's step (a record claiming
2**63-1 must not use up every later generation). Each of these depends on the record and the fleet-wide
configuration only, so every worker takes the same decision. A rejected announcement changes
nothing: not the desired state, not the generation.

Loading the artifact (fetch, digest match, onnxruntime, feature-spec signature, warm-up) is *realization*,
done by each worker afterwards (see follower.py): a failure there is reported as a rejection on the status
topic and the worker keeps serving the newest accepted state it can load, but the desired state stays the
announced one. Load failures depend on more than the record (network, memory, the worker's image during
a rolling upgrade), so letting them decide the fleet's state would let one worker's bad minute split it.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.signing import TrustedKeys
from streamserve.errors import DecodeError

Mode = Literal["deploy", "canary", "shadow"]

_DIGEST = re.compile(r"[0-9a-f]{64}")
HISTORY = 32
"""Accepted states remembered: a worker that cannot load the newest falls back through these."""
MAX_GENERATION = 2**63 - 1
"""Generations are Avro longs."""


def digest_problem(value: str | None) -> str | None:
    """Why a sha256 is unusable (empty, not 64 lowercase hex digits), or None."""
    if not value:
        return "empty sha256 (the artifact digest is required)"
    if not _DIGEST.fullmatch(value):
        return f"malformed sha256 {value[:80]!r} (want 64 lowercase hex digits)"
    return None


def uri_scheme(uri: str) -> str:
    """The URI's scheme; plain paths count as ``file``."""
    return urllib.parse.urlparse(uri).scheme.lower() or "file"


@dataclass(frozen=True)
class ArtifactRef:
    """One model version's artifact."""

    version: str
    uri: str
    sha256: str
    profile_uri: str | None = None
    """The version's reference profile (drift), fetched and verified with the artifact; None: none."""
    profile_sha256: str | None = None


@dataclass(frozen=True)
class DesiredState:
    """What every worker should serve for one model after an accepted announcement."""

    generation: int
    mode: Mode
    live: ArtifactRef | None
    """The version scoring the main output; None means the version of the workers' config."""
    candidate: ArtifactRef | None = None
    """The canary or shadow version."""
    canary_share: float = 0.0

    @property
    def version(self) -> str:
        """The version this state asks for (the candidate under canary/shadow)."""
        ref = self.candidate or self.live
        return ref.version if ref is not None else "(config)"


@dataclass(frozen=True)
class AcceptancePolicy:
    """What a worker (or the publisher) accepts; must be the same on every worker of a fleet."""

    model: str
    trusted: TrustedKeys = field(default_factory=lambda: TrustedKeys({}))
    require_signatures: bool = False
    allowed_schemes: frozenset[str] = frozenset({"file", "http", "https"})
    max_generation_step: int = 1_000_000
    """An accepted generation is at most this far above the last accepted one (control.max_generation_step)."""


@dataclass(frozen=True)
class Rejection:
    """Why an announcement (or a record that may have been one) was refused."""

    reason: str
    generation: int | None = None
    version: str | None = None


@dataclass(frozen=True)
class RolloutState:
    """The accepted history of one model: its last generation and the desired states, oldest first."""

    generation: int = 0
    history: tuple[DesiredState, ...] = ()

    @property
    def desired(self) -> DesiredState | None:
        """The state the fleet should serve; None until an announcement was accepted."""
        return self.history[-1] if self.history else None

    def offer(self, announcement: ModelAnnouncement, policy: AcceptancePolicy) -> tuple[RolloutState, Rejection | None]:
        """The state after one announcement of this model, and the rejection when it is refused."""
        problem = _problem(self, announcement, policy)
        if problem is not None:
            return self, Rejection(problem, announcement.generation, announcement.version)
        desired = _desired(announcement, self.desired)
        return replace(self, generation=announcement.generation, history=(*self.history, desired)[-HISTORY:]), None

    def offer_record(self, value: bytes | None, policy: AcceptancePolicy) -> tuple[RolloutState, Rejection | None]:
        """Like ``offer`` for raw control-topic bytes; tombstones and other models' records change nothing."""
        if not value:
            return self, None
        try:
            announcement = ModelAnnouncement.decode(value)
        except DecodeError as exc:
            return self, Rejection(str(exc))
        if announcement.model != policy.model:
            return self, None
        return self.offer(announcement, policy)


def replay(records: Iterable[bytes | None], policy: AcceptancePolicy) -> RolloutState:
    """The state after a sequence of control-topic records (in topic order)."""
    state = RolloutState()
    for value in records:
        state, _ = state.offer_record(value, policy)
    return state


def _problem(state: RolloutState, a: ModelAnnouncement, policy: AcceptancePolicy) -> str | None:
    return (
        _signature_problem(a, policy)
        or _generation_problem(state.generation, a.generation, policy.max_generation_step)
        or ("empty version" if not a.version else None)
        or _artifact_problem(a, policy)
        or _share_problem(a)
    )


def _signature_problem(a: ModelAnnouncement, policy: AcceptancePolicy) -> str | None:
    if policy.require_signatures:
        return policy.trusted.check(a)
    if a.signature is not None and a.key_id in policy.trusted.keys:
        return policy.trusted.check(a)  # not required, but a signature that is there must hold
    return None


def _artifact_problem(a: ModelAnnouncement, policy: AcceptancePolicy) -> str | None:
    artifacts = [("", a.uri, a.sha256)]
    if a.baseline_version is not None or a.baseline_uri is not None or a.baseline_sha256 is not None:
        if not (a.baseline_version and a.baseline_uri):
            return "baseline_version, baseline_uri and baseline_sha256 go together"
        artifacts.append(("baseline ", a.baseline_uri, a.baseline_sha256 or ""))
    if a.profile_uri is not None or a.profile_sha256 is not None:
        if not a.profile_uri:
            return "profile_uri and profile_sha256 go together"
        artifacts.append(("profile ", a.profile_uri, a.profile_sha256 or ""))
    for label, uri, sha256 in artifacts:
        problem = digest_problem(sha256)
        if problem is not None:
            return f"{label}{problem}"
        scheme = uri_scheme(uri)
        if scheme not in policy.allowed_schemes:
            return f"{label}artifact URI scheme {scheme!r} is not allowed (allowed: {sorted(policy.allowed_schemes)})"
    return None


def _share_problem(a: ModelAnnouncement) -> str | None:
    if a.action == "canary" and not 0.0 < a.canary_share < 1.0:
        return f"canary share must be between 0 and 1, got {a.canary_share}"
    return None


def _generation_problem(accepted: int, generation: int, max_step: int) -> str | None:
    """Why a generation cannot follow the accepted one: not above it, or further above it than max_step (a
    record claiming 2**63-1 would otherwise leave no generation for any later announcement)."""
    if generation <= accepted:
        return (
            f"generation {generation} is not above the accepted generation {accepted} "
            "(a replayed or stale announcement)"
        )
    if generation > MAX_GENERATION:
        return f"generation {generation} does not fit an Avro long"
    if generation - accepted > max_step:
        return (
            f"generation {generation} is more than {max_step:,} above the accepted generation {accepted} "
            "(control.max_generation_step): a forged or corrupt announcement"
        )
    return None


def _desired(a: ModelAnnouncement, previous: DesiredState | None) -> DesiredState:
    ref = ArtifactRef(a.version, a.uri, a.sha256, a.profile_uri, a.profile_sha256)
    if a.action in ("deploy", "rollback"):
        return DesiredState(a.generation, "deploy", ref)
    if a.baseline_version and a.baseline_uri and a.baseline_sha256:
        live: ArtifactRef | None = ArtifactRef(a.baseline_version, a.baseline_uri, a.baseline_sha256)
    else:
        live = previous.live if previous is not None else None
    mode: Mode = "canary" if a.action == "canary" else "shadow"
    return DesiredState(a.generation, mode, live, ref, a.canary_share if mode == "canary" else 0.0)
