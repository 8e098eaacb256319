"""The classification task: what ImageClassifier does between the shared steps.

decode (an upload resized to the model's input) -> [batch -> runtime, shared] -> postprocess (top-k
over the graph's `probabilities`) -> record (answers per class, confidence, latency). The
predictor (serving/predictor.py) runs these for every batch; a second task is a sibling module
with the same four functions.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from . import metrics
from .contract import GraphSpec, InputSpec
from .preprocess import decode_image
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


class Classification:
    """Top-k classification over a graph with `probabilities` and `features` outputs."""

    name = "classification"
    options_model = None  # a classification request has no options

    @staticmethod
    def options(fields: Mapping[str, Any]) -> None:
        return None

    def __init__(self, labels: Sequence[str], top_k: int) -> None:
        self.labels = list(labels)
        self.top_k = top_k
        # The Open Inference Protocol's outputs: every class's probability, and the best label.
        self.tensor_outputs = [("probabilities", "FP32", (-1, len(self.labels))),
                               ("label", "BYTES", (-1,))]

    @staticmethod
    def output_names(graph: GraphSpec) -> list[str]:
        return [graph.probabilities_name, graph.features_name]

    @staticmethod
    def decode(image: bytes | Image.Image, spec: InputSpec, max_pixels: int | None,
               options: None = None) -> tuple[np.ndarray, None]:
        """An upload -> the graph's input pixels; a classifier needs nothing else per image."""
        return decode_image(image, spec, max_pixels), None

    @staticmethod
    def tensor_context(spec: InputSpec, options: None = None) -> None:
        """A tensor row is already the graph's input: nothing to remember for it."""
        return None

    def postprocess(self, outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                    contexts: Sequence[Any], models: Sequence[str],
                    processing_ms: Sequence[float]) -> list[Prediction]:
        return to_predictions(outputs[graph.probabilities_name], self.labels, self.top_k,
                              models, processing_ms)

    @staticmethod
    def record(predictions: Sequence[Prediction], seconds: Sequence[float]) -> None:
        """Per model: answers by class, their confidence and their latency."""
        by_class = Counter((p.model, p.label) for p in predictions)
        for (model, label), count in by_class.items():
            metrics.labelled(metrics.predictions(), model, label).inc(count)
        for prediction, elapsed in zip(predictions, seconds):
            metrics.labelled(metrics.confidence(), prediction.model).observe(prediction.confidence)
            metrics.labelled(metrics.processing_seconds(), prediction.model).observe(elapsed)

    @staticmethod
    def tensors(outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                answers: Sequence[Prediction], contexts: Sequence[None]) -> list[dict[str, Any]]:
        """Per image: its probabilities (all classes, in class order) and its label."""
        probabilities = outputs[graph.probabilities_name].astype(np.float32, copy=False)
        return [{"probabilities": row, "label": answer.label, "model": answer.model}
                for row, answer in zip(probabilities, answers)]

    @staticmethod
    def agreement(shadow_outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                  served: Sequence[Prediction], contexts: Sequence[None]) -> np.ndarray:
        """Per image: did the shadow's top class equal the served one?"""
        shadow_classes = shadow_outputs[graph.probabilities_name].argmax(axis=1)
        return np.asarray(shadow_classes == np.array([p.class_id for p in served]))
