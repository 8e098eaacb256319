"""Classification post-processing (to_predictions): top-k ordering, ties, k larger than the
number of classes, input order."""

from __future__ import annotations

import numpy as np

from serving.classification import to_predictions, top_k_indices

LABELS = ["cat", "dog", "fox", "owl"]


def test_top_k_is_sorted_best_first() -> None:
    probabilities = np.array([[0.1, 0.6, 0.05, 0.25]], dtype=np.float32)
    assert top_k_indices(probabilities, 3).tolist() == [[1, 3, 0]]


def test_ties_keep_class_order_and_k_is_capped() -> None:
    probabilities = np.full((1, 4), 0.25, dtype=np.float32)
    assert top_k_indices(probabilities, 10).tolist() == [[0, 1, 2, 3]]


def test_predictions_follow_input_order_and_carry_tag_and_time() -> None:
    probabilities = np.array([[0.7, 0.1, 0.1, 0.1], [0.0, 0.0, 0.1, 0.9]], dtype=np.float32)
    first, second = to_predictions(probabilities, LABELS, 2, ["m:v1", "m:v2"], [1.5, 2.25])
    assert (first.label, first.class_id, second.label, second.class_id) == ("cat", 0, "owl", 3)
    assert abs(first.confidence - 0.7) < 1e-6 and len(first.top_k) == 2
    assert [s.label for s in second.top_k] == ["owl", "fox"]
    assert (first.model, second.model) == ("m:v1", "m:v2")
    assert (first.processing_ms, second.processing_ms) == (1.5, 2.25)
