"""Train the demo's two classifier versions with scikit-learn and convert them with skl2onnx."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamserve.demo.data import Entities, feature_row, fraud_label, make_events, streamed_counts

log = logging.getLogger(__name__)

N_FEATURES = 7


@dataclass(frozen=True)
class TrainedModel:
    """An ONNX artifact on disk and how well it separates a holdout set."""

    version: str
    path: Path
    auc: float


def training_set(entities: Entities, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels from synthetic events; the card's transaction count as the streaming app counts it."""
    events = list(make_events(entities, rows, seed=seed))
    # The worker scores an event while the streaming app folds it in beside it: what Redis holds then is the
    # count of the card's earlier transactions (a missing key, the first one, reads the default 0).
    earlier = [count - 1 for count in streamed_counts(events)]
    matrix = np.array(
        [feature_row(event, entities, count) for event, count in zip(events, earlier, strict=True)], dtype=np.float32
    )
    return matrix, fraud_label(matrix.astype(np.float64), np.random.default_rng(seed))


def train_versions(entities: Entities, out_dir: Path, rows: int = 20_000) -> list[TrainedModel]:
    """v1: logistic regression; v2: gradient boosting, measurably better on the same holdout."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out_dir.mkdir(parents=True, exist_ok=True)
    features, labels = training_set(entities, rows, seed=1)
    holdout_x, holdout_y = training_set(entities, rows // 4, seed=2)
    candidates = {
        "v1": make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)),
        "v2": GradientBoostingClassifier(n_estimators=60, max_depth=3, random_state=0),
    }
    trained = []
    for version, estimator in candidates.items():
        estimator.fit(features, labels)
        auc = float(roc_auc_score(holdout_y, estimator.predict_proba(holdout_x)[:, 1]))
        onnx_model = to_onnx(
            estimator,
            features[:1],
            options={"zipmap": False},
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
        path = out_dir / f"fraud-{version}.onnx"
        path.write_bytes(onnx_model.SerializeToString())
        log.info("trained %s: holdout AUC %.3f -> %s", version, auc, path)
        trained.append(TrainedModel(version, path, auc))
    return trained
