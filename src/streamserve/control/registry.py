"""The model registry: loads versions off the hot path and swaps the routing between batches.

Order is always load new -> verify -> validate -> warm up -> check the score contract (contract.py) -> switch
pointer -> release old; a version that fails any step never serves and the current routing stays in place.
The last few loaded versions stay in memory, so a rollback is a pointer switch. Listeners given at
construction (as MLServer's registry hooks) are told of each version loaded, each routing switched and each
version released.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.control.contract import check_score_contract
from streamserve.control.fetch import fetch_verified, redact
from streamserve.control.rollout import ArtifactRef, DesiredState
from streamserve.errors import ConfigError, ModelError
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.profile import ReferenceProfile
from streamserve.pipeline.routing import Routing

log = logging.getLogger(__name__)

LoadListener = Callable[[OnnxModel], None]
"""Told of a model version loaded, verified and warmed up (not of one taken from the cache)."""
UnloadListener = Callable[[OnnxModel], None]
"""Told of a model version released from the cache (no routing uses it)."""
SwapListener = Callable[[DesiredState | None, Routing], None]
"""Told of a routing switched in, and the desired state it realizes (None: the config's version)."""


class ModelLoader:
    """Fetches, verifies, loads (signature check and warm-up included) and caches model versions."""

    def __init__(
        self,
        settings: ModelSettings,
        features: Sequence[FeatureSpec],
        keep_versions: int = 3,
        cache_dir: Path | None = None,
        on_load: Sequence[LoadListener] = (),
        on_unload: Sequence[UnloadListener] = (),
    ) -> None:
        self.settings = settings
        self.features = list(features)
        self.on_load = tuple(on_load)
        self.on_unload = tuple(on_unload)
        self.keep_versions = keep_versions
        self.cache_dir = cache_dir
        self._cache: OrderedDict[tuple[str, str], OnnxModel] = OrderedDict()
        self._lock = threading.Lock()

    def load(
        self,
        version: str,
        uri: str,
        sha256: str | None,
        profile_uri: str | None = None,
        profile_sha256: str | None = None,
    ) -> OnnxModel:
        """A loaded, verified, warmed-up model version with its verified reference profile, if it has one (from
        the cache when already loaded)."""
        with self._lock:
            for (cached_version, digest), model in self._cache.items():
                if (
                    cached_version == version
                    and (not sha256 or digest == sha256)
                    and _same_profile(model, profile_sha256)
                ):
                    self._cache.move_to_end((cached_version, digest))
                    return model
        started = time.perf_counter()
        data, digest = fetch_verified(uri, sha256, self.cache_dir)
        profile = load_profile(profile_uri, profile_sha256) if profile_uri else None
        model = OnnxModel.load(data, self.settings, version, self.features, sha256=digest, uri=uri, profile=profile)
        log.info(
            "loaded %s %s from %s in %.0f ms",
            self.settings.name,
            version,
            redact(uri),
            (time.perf_counter() - started) * 1000,
        )
        with self._lock:
            self._cache[(version, digest)] = model
            self._cache.move_to_end((version, digest))
        for listener in self.on_load:
            listener(model)
        return model

    def release_unused(self, in_use: set[int]) -> None:
        """Forget the least recently used versions beyond keep_versions that no routing uses."""
        released = []
        with self._lock:
            while len(self._cache) > self.keep_versions:
                oldest = next((key for key, model in self._cache.items() if id(model) not in in_use), None)
                if oldest is None:
                    break
                released.append(self._cache.pop(oldest))
        for model in released:
            for listener in self.on_unload:
                listener(model)


class ModelRegistry:
    """Holds the current Routing of one model and the desired state it realizes."""

    def __init__(
        self,
        settings: ModelSettings,
        features: Sequence[FeatureSpec],
        keep_versions: int = 3,
        cache_dir: Path | None = None,
        *,
        on_load: Sequence[LoadListener] = (),
        on_swap: Sequence[SwapListener] = (),
        on_unload: Sequence[UnloadListener] = (),
    ) -> None:
        self.settings = settings
        self.on_swap = tuple(on_swap)
        self.desired_version = settings.version
        """The version of the last desired state asked for, loaded or not (the config's until one is)."""
        self.loader = ModelLoader(settings, features, keep_versions, cache_dir, on_load, on_unload)
        self.routing = Routing(live=self.load(None))
        self.serving: DesiredState | None = None
        """The accepted state the routing realizes; None: the config's version."""
        self.since_ms = _now_ms()

    def load(self, ref: ArtifactRef | None) -> OnnxModel:
        """One version (None: the config's), loaded and warmed up or from the cache; raises when it cannot serve."""
        if ref is None:
            return self.loader.load(self.settings.version, self.settings.uri, self.settings.sha256)
        return self.loader.load(ref.version, ref.uri, ref.sha256, ref.profile_uri, ref.profile_sha256)

    def realize(self, desired: DesiredState | None) -> Routing:
        """Load what a desired state needs, then switch the routing; raises (routing unchanged) if it cannot."""
        if desired is not None:
            self.desired_version = desired.version
        live = self.load(desired.live if desired is not None else None)
        check_score_contract(self.settings, self.routing.live, live)
        if desired is None or desired.mode == "deploy":
            routing = Routing(live=live)
        else:
            candidate = self.load(desired.candidate)
            check_score_contract(self.settings, live, candidate)
            routing = Routing(live=live, mode=desired.mode, candidate=candidate, canary_share=desired.canary_share)
        self.routing = routing  # the hot loop reads this once per batch: the swap is between batches
        self.serving = desired
        self.since_ms = _now_ms()
        self.loader.release_unused({id(routing.live), id(routing.candidate)})
        gc.freeze()  # a loaded model lives until it is released: keep the cyclic collector off its objects
        log.info(
            "serving %s %s (mode %s%s, generation %d)",
            self.settings.name,
            routing.live.version,
            routing.mode,
            f", candidate {routing.candidate.version}" if routing.candidate else "",
            desired.generation if desired is not None else 0,
        )
        for listener in self.on_swap:
            listener(desired, routing)
        return routing


def load_profile(uri: str, sha256: str | None) -> tuple[ReferenceProfile, str]:
    """A version's reference profile and its digest, its bytes checked against the announced digest
    (DigestMismatch otherwise)."""
    data, digest = fetch_verified(uri, sha256)
    try:
        return ReferenceProfile.from_bytes(data), digest
    except ConfigError as exc:
        raise ModelError(f"reference profile {redact(uri)} (sha256 {digest[:12]}...): {exc}") from exc


def _same_profile(model: OnnxModel, profile_sha256: str | None) -> bool:
    """A cached model serves an announcement that names its profile or none (a baseline reference names none: the
    profile verified when the version was announced still holds for the same model bytes)."""
    return profile_sha256 is None or model.profile_sha256 == profile_sha256.lower()


def _now_ms() -> int:
    return int(time.time() * 1000)
