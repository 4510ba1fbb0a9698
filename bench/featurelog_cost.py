"""`python -m bench.featurelog_cost`: what the feature log adds to one scored event, in process (no Kafka).

The bench's paired throughput runs (streamserve-1 vs streamserve-1-featurelog) are noisy on a shared machine;
this measures the tap alone: FeatureLog.scored on batches of 1024 events with uuid ids and 7 numeric features
(the fraud demo's shape), at the given shares, in ns per scored event.
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np

from streamserve.config import InputSettings
from streamserve.pipeline.featurelog import FeatureLog
from streamserve.records import Event, ModelOutputs, Source


class _Model:
    name = "fraud"
    version = "v1"


def per_event_ns(share: float, batch: int = 1024, repeats: int = 300) -> float:
    """The median over 5 rounds of FeatureLog.scored's time per event of a batch."""
    settings = InputSettings.model_construct(event_id_field="event_id", event_time_field=None)
    events = [
        Event(Source("t", 0, i, None, None, None, 0), {"event_id": str(uuid.uuid4()), "amount": 1.0})
        for i in range(batch)
    ]
    rng = np.random.default_rng(0)
    columns = {f"feature_{i}": rng.random(batch) for i in range(7)}
    outputs = ModelOutputs(rng.random(batch), np.zeros(batch, dtype=np.int64))
    log, rows = FeatureLog("features", share, settings, None), np.arange(batch)
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            log.scored(events, columns, rows, outputs, _Model())  # type: ignore[arg-type]
        rounds.append((time.perf_counter() - started) / repeats / batch * 1e9)
    return float(np.median(rounds))


def main() -> None:
    """Print the cost per event at each share."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", default="0.01,0.1,1.0", help="comma-separated shares (0.01,0.1,1.0)")
    args = parser.parse_args()
    for share in (float(s) for s in args.shares.split(",")):
        print(f"share {share:g}: {per_event_ns(share):.0f} ns per scored event")


if __name__ == "__main__":
    main()
