"""Runtime output -> per-image answers (top-k over the graph's probabilities)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .schemas import ClassScore, Prediction


def top_k_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest probabilities per row, best first (ties: lower class id first)."""
    k = min(k, probabilities.shape[1])
    # argsort is stable: negate so that equal probabilities keep ascending class order.
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


def to_predictions(
    probabilities: np.ndarray,
    labels: Sequence[str],
    k: int,
    models: Sequence[str],
    processing_ms: Sequence[float],
) -> list[Prediction]:
    """One Prediction per row; `models[i]` is the tag of the model that produced row i."""
    predictions = []
    rows = zip(probabilities, top_k_indices(probabilities, k), models, processing_ms)
    for row, order, model_tag, elapsed in rows:
        scores = [
            ClassScore(label=labels[i], class_id=int(i), probability=float(row[i])) for i in order
        ]
        best = scores[0]
        predictions.append(
            Prediction(
                label=best.label,
                class_id=best.class_id,
                confidence=best.probability,
                top_k=scores,
                model=model_tag,
                processing_ms=round(elapsed, 3),
            )
        )
    return predictions
