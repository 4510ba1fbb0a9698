"""The model registry: loads versions off the hot path and swaps the routing between batches.

Order is always load new -> verify -> validate -> warm up -> switch pointer -> release old; a
version that fails any step never serves and the current routing stays in place. The last few
loaded versions stay in memory, so a rollback is a pointer switch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamserve.config import FeatureSpec, ModelSettings
from streamserve.control.announcements import ModelAnnouncement
from streamserve.control.fetch import fetch_verified
from streamserve.errors import ModelError
from streamserve.pipeline.infer import OnnxModel

log = logging.getLogger(__name__)

_BUCKETS = 10_000


@dataclass(frozen=True)
class Routing:
    """Which model versions score a batch: read once per batch, replaced whole on a swap."""

    live: OnnxModel
    mode: str = "deploy"
    candidate: OnnxModel | None = None
    canary_share: float = 0.0

    def canary_mask(self, keys: list[str]) -> np.ndarray:
        """Rows whose key hashes into the canary share (stable: a key keeps its side)."""
        threshold = round(self.canary_share * _BUCKETS)
        buckets = np.fromiter((canary_bucket(key) for key in keys), dtype=np.int64, count=len(keys))
        return buckets < threshold


def canary_bucket(key: str) -> int:
    """A stable bucket in [0, 10000) for a key, the same on every worker and every run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS


@dataclass(frozen=True)
class RegistryState:
    """For status reports: what is served, what is loading, the last rejection."""

    state: str
    loading_version: str | None
    rejected_version: str | None
    reason: str | None
    since_ms: int


class ModelRegistry:
    """Holds the current Routing and the cache of loaded versions for one model."""

    def __init__(
        self,
        settings: ModelSettings,
        features: Sequence[FeatureSpec],
        keep_versions: int = 3,
        cache_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.features = list(features)
        self.keep_versions = keep_versions
        self._cache: OrderedDict[tuple[str, str], OnnxModel] = OrderedDict()
        self._lock = threading.Lock()
        initial = self.load(settings.version, settings.uri, settings.sha256)
        self.routing = Routing(live=initial)
        self.status = RegistryState("serving", None, None, None, _now_ms())

    def load(self, version: str, uri: str, sha256: str | None) -> OnnxModel:
        """A loaded, verified, warmed-up model version (from the cache when already loaded)."""
        with self._lock:
            for (cached_version, digest), model in self._cache.items():
                if cached_version == version and (not sha256 or digest == sha256):
                    self._cache.move_to_end((cached_version, digest))
                    return model
        started = time.perf_counter()
        data, digest = fetch_verified(uri, sha256, self.cache_dir)
        model = OnnxModel.load(data, self.settings, version, self.features, sha256=digest, uri=uri)
        log.info(
            "loaded %s %s from %s in %.0f ms", self.settings.name, version, uri, (time.perf_counter() - started) * 1000
        )
        with self._lock:
            self._cache[(version, digest)] = model
            self._cache.move_to_end((version, digest))
        return model

    def apply(self, announcement: ModelAnnouncement) -> Routing:
        """Load what the announcement needs, then switch the routing; raises ModelError if rejected."""
        self.status = RegistryState("loading", announcement.version, None, None, self.status.since_ms)
        try:
            candidate = self.load(announcement.version, announcement.uri, announcement.sha256)
            if announcement.action in ("deploy", "rollback"):
                routing = Routing(live=candidate)
            else:
                live = self.routing.live
                if announcement.baseline_version and announcement.baseline_uri:
                    live = self.load(
                        announcement.baseline_version, announcement.baseline_uri, announcement.baseline_sha256
                    )
                routing = Routing(
                    live=live,
                    mode=announcement.action,
                    candidate=candidate,
                    canary_share=announcement.canary_share if announcement.action == "canary" else 0.0,
                )
        except ModelError as exc:
            log.error("rejected %s %s: %s", announcement.model, announcement.version, exc)
            self.status = RegistryState(
                "rejected", None, announcement.version, f"{type(exc).__name__}: {exc}", self.status.since_ms
            )
            raise
        self.routing = routing  # the hot loop reads this once per batch: the swap is between batches
        self.status = RegistryState("serving", None, None, None, _now_ms())
        self._release_unused()
        log.info(
            "serving %s %s (mode %s%s)",
            self.settings.name,
            routing.live.version,
            routing.mode,
            f", candidate {routing.candidate.version}" if routing.candidate else "",
        )
        return routing

    def _release_unused(self) -> None:
        in_use = {id(self.routing.live), id(self.routing.candidate)}
        with self._lock:
            while len(self._cache) > self.keep_versions:
                oldest = next((key for key, model in self._cache.items() if id(model) not in in_use), None)
                if oldest is None:
                    break
                del self._cache[oldest]


def _now_ms() -> int:
    return int(time.time() * 1000)
