"""Drift on the stream: the PSI of each feature and of the score over windows of scored events.

``DriftTap`` is a ``ScoredTap`` (pipeline/process.py): for every live lane whose model version carries a
reference profile (pipeline/profile.py, fetched and verified with the model), it adds the lane's bin counts to
that version's open window, a few numpy calls per feature and batch. When a window holds ``window`` events it
computes the PSI of every profiled quantity, reports each to the observer (the ``streamserve_drift_psi``
gauge) and writes a drift record (schemas/drift.avsc) for each above the threshold; then a new window opens.

It runs in the worker rather than in a monitor reading the feature log: the worker sees every scored event,
not a 1% sample, so a window fills in seconds, and the profile arrives with the model through the control plane
that already verifies it.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import fastavro
import numpy as np

from streamserve.pipeline.encode import EncodedBatch
from streamserve.pipeline.infer import OnnxModel
from streamserve.pipeline.profile import FeatureProfile, ReferenceProfile, psi
from streamserve.records import Event, Headers, ModelOutputs, Source
from streamserve.schemas import bundled

log = logging.getLogger(__name__)

TOP_BINS = 3
"""Bins named in a drift record, by contribution."""


class DriftObserver(Protocol):
    """Told of each window's PSI per profiled quantity (the metrics)."""

    def drift_psi(self, model: str, version: str, feature: str, value: float) -> None:
        """The PSI of one feature (or the score) of one version over the last window."""
        ...


@dataclass(slots=True)
class _Window:
    """The open window of one model version: bin counts per profiled quantity."""

    profile: ReferenceProfile
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    events: int = 0
    first_ms: int | None = None
    last_ms: int = 0


class DriftTap:
    """Counts scored events into their reference bins and reports the PSI of each full window."""

    def __init__(self, topic: str, window: int, threshold: float, observer: DriftObserver | None = None) -> None:
        self.topic = topic
        self.window = window
        self.threshold = threshold
        self._observer = observer
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._schema = bundled("drift")
        self.last: dict[tuple[str, str], dict[str, float]] = {}
        """Per (model, version), the PSI of each profiled quantity over its last full window."""

    def scored(
        self,
        events: Sequence[Event],
        columns: dict[str, np.ndarray],
        rows: np.ndarray,
        outputs: ModelOutputs,
        model: OnnxModel,
    ) -> tuple[str, EncodedBatch] | None:
        """Add one lane's scored events to its version's window; the drift records of a window that filled."""
        profile = model.profile
        if profile is None or not len(events):
            return None
        key = (model.name, model.version, model.profile_sha256)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(profile)
        everything = len(rows) == len(next(iter(columns.values()))) if columns else True
        for entry in profile.features:
            column = columns.get(entry.feature or "")
            if column is None:
                continue
            _add(window.counts, entry, column if everything and _ordered(rows) else column[rows])
        if profile.score is not None:
            _add(window.counts, profile.score, outputs.score)
        window.events += len(events)
        times = [event.source.timestamp_ms for event in (events[0], events[-1])]
        window.first_ms = times[0] if window.first_ms is None else window.first_ms
        window.last_ms = times[1]
        if window.events < self.window:
            return None
        del self._windows[key]
        return self._close(model, window, events[-1].source)

    def _close(self, model: OnnxModel, window: _Window, source: Source) -> tuple[str, EncodedBatch] | None:
        """PSI of every quantity of a full window; drift records for those above the threshold."""
        out = EncodedBatch()
        found: dict[str, float] = {}
        headers: Headers = [("streamserve.model.version", model.version.encode())]
        for entry in window.profile.all():
            counts = window.counts.get(entry.name)
            if counts is None:
                continue
            value, contributions = psi(entry.expected, counts)
            found[entry.name] = value
            if self._observer is not None:
                self._observer.drift_psi(model.name, model.version, entry.name, value)
            if value > self.threshold:
                record = self._record(model, window, entry, value, counts, contributions)
                out.sources.append(source)
                out.keys.append(f"{model.name}/{model.version}/{entry.name}".encode())
                out.values.append(record)
                out.headers.append(headers)
        self.last[(model.name, model.version)] = found
        drifted = {name: round(value, 3) for name, value in found.items() if value > self.threshold}
        if drifted:
            log.warning("drift in %s %s over %d events: PSI %s", model.name, model.version, window.events, drifted)
        return (self.topic, out) if len(out) else None

    def _record(
        self,
        model: OnnxModel,
        window: _Window,
        entry: FeatureProfile,
        value: float,
        counts: np.ndarray,
        contributions: np.ndarray,
    ) -> bytes:
        actual = counts / max(int(counts.sum()), 1)
        names = entry.bin_names()
        ranked = sorted(range(len(names)), key=lambda i: -abs(float(contributions[i])))[:TOP_BINS]
        buffer = io.BytesIO()
        fastavro.schemaless_writer(
            buffer,
            self._schema,
            {
                "model": model.name,
                "version": model.version,
                "feature": entry.name,
                "psi": value,
                "threshold": self.threshold,
                "window_events": window.events,
                "window_start": window.first_ms or 0,
                "window_end": window.last_ms,
                "top_bins": [
                    {
                        "bin": names[i],
                        "expected": float(entry.expected[i]),
                        "actual": float(actual[i]),
                        "contribution": float(contributions[i]),
                    }
                    for i in ranked
                ],
                "detected_at": int(time.time() * 1000),
            },
        )
        return buffer.getvalue()


def _add(counts: dict[str, np.ndarray], entry: FeatureProfile, column: np.ndarray) -> None:
    found = entry.counts(column)
    held = counts.get(entry.name)
    counts[entry.name] = found if held is None else held + found


def _ordered(rows: np.ndarray) -> bool:
    """rows is 0, 1, 2...: the columns are the events' own, no selection needed."""
    return bool(len(rows) == 0 or (rows[0] == 0 and rows[-1] == len(rows) - 1))
