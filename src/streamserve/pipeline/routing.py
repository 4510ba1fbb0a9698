"""Routing: which model versions score a batch, and the plan of lanes the data plane runs without knowing modes.

The control plane builds a Routing (control/registry.py) and swaps it whole between batches; the processor
reads it once per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamserve.pipeline.infer import OnnxModel

_BUCKETS = 10_000


@dataclass(frozen=True, slots=True)
class Lane:
    """Rows of a batch that one model scores; live lanes' outputs are predictions, the others shadow outputs."""

    model: OnnxModel
    rows: np.ndarray
    live: bool


@dataclass(frozen=True)
class Routing:
    """Which model versions score a batch: read once per batch, replaced whole on a swap."""

    live: OnnxModel
    mode: str = "deploy"
    candidate: OnnxModel | None = None
    canary_share: float = 0.0

    def plan(self, n: int, keys: Callable[[], list[str]]) -> list[Lane]:
        """The lanes that score n rows: which model scores which rows, and whether its outputs are live.

        Canary splits the rows by key (``keys`` is called only then); shadow scores every row twice, the
        candidate's outputs going to the shadow topic. The data plane runs the lanes without knowing the modes.
        """
        everything = np.ones(n, dtype=bool)
        if self.candidate is None or self.mode == "deploy":
            return [Lane(self.live, everything, live=True)]
        if self.mode == "canary":
            to_candidate = self.canary_mask(keys())
            return [Lane(self.live, ~to_candidate, live=True), Lane(self.candidate, to_candidate, live=True)]
        return [Lane(self.live, everything, live=True), Lane(self.candidate, everything, live=False)]

    def canary_mask(self, keys: list[str]) -> np.ndarray:
        """Rows whose key hashes into the canary share (stable: a key keeps its side)."""
        threshold = round(self.canary_share * _BUCKETS)
        buckets = np.fromiter((canary_bucket(key) for key in keys), dtype=np.int64, count=len(keys))
        return buckets < threshold


def canary_bucket(key: str) -> int:
    """A stable bucket in [0, 10000) for a key, the same on every worker and every run."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % _BUCKETS
