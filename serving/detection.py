"""The detection task: what ObjectDetector does between the shared steps.

decode (an upload letterboxed into the model's fixed input, its geometry kept) -> [batch ->
runtime, shared] -> postprocess (per image, with its request's thresholds: score threshold,
per-class NMS, top-k, boxes mapped back to the upload's pixels; serving/boxes.py) -> record
(detections per image, scores, detections per class, latency). A sibling of
serving/classification.py with the same functions; the predictor runs either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import metrics
from .boxes import Letterbox, letterbox, letterbox_geometry, select_detections, to_image_pixels
from .contract import DetectionSpec, GraphSpec, InputSpec
from .errors import RejectedInput
from .preprocess import pillow_errors_as_invalid_image, upright_image
from .schemas import DetectedObject, DetectionResult
from .settings import DetectionSettings


class InvalidOption(RejectedInput):
    code = "invalid_option"


class DetectionOptions(BaseModel):
    """Per-request overrides of the configured `detection` defaults: form fields beside the
    images on /detect, JSON keys beside `pixels` on /detect_tensor."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    confidence_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Detections scoring at or below this are dropped.")
    iou_threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="Per-class NMS: of two boxes of one class overlapping more than this, the "
        "lower-scoring one is dropped.")
    max_detections: int | None = Field(
        default=None, ge=1, le=1000, description="At most this many detections per image.")


@dataclass(frozen=True, slots=True)
class Thresholds:
    confidence: float
    iou: float
    max_detections: int


@dataclass(frozen=True, slots=True)
class ImageContext:
    """What one image's post-processing needs: where it sits in the frame, and its request's
    thresholds (requests in one batch may ask for different ones)."""

    letterbox: Letterbox
    thresholds: Thresholds


class Detection:
    """Detection over a graph with `boxes` (N, A, 4) in input pixels, per-class `scores`
    (N, A, K) and pooled `features` (N, D) outputs."""

    name = "detection"
    options_model = DetectionOptions

    def __init__(self, labels: Sequence[str], spec: DetectionSpec,
                 defaults: DetectionSettings) -> None:
        self.labels = list(labels)
        self.spec = spec
        self.defaults = Thresholds(defaults.confidence_threshold, defaults.iou_threshold,
                                   defaults.max_detections)
        # The Open Inference Protocol's outputs, padded to K = the request's max_detections
        # (Triton's convention): num_detections says how many rows of each image are real.
        self.tensor_outputs = [("boxes", "FP32", (-1, -1, 4)), ("scores", "FP32", (-1, -1)),
                               ("labels", "INT64", (-1, -1)), ("num_detections", "INT32", (-1,))]

    def options(self, fields: Mapping[str, Any]) -> Thresholds:
        """A request's option fields (strings from a form, values from JSON) -> its thresholds,
        the configured defaults where a field is absent or empty."""
        given = {k: v for k, v in fields.items() if k in DetectionOptions.model_fields
                 and v not in ("", None)}
        try:
            options = DetectionOptions.model_validate(given)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            name = ".".join(str(p) for p in error["loc"])
            raise InvalidOption(
                f"{name}: {error['msg']} (got {error['input']!r}); confidence_threshold and "
                "iou_threshold take a number from 0 to 1, max_detections a whole number from 1 "
                "to 1000") from None
        return Thresholds(
            self.defaults.confidence if options.confidence_threshold is None
            else options.confidence_threshold,
            self.defaults.iou if options.iou_threshold is None else options.iou_threshold,
            self.defaults.max_detections if options.max_detections is None
            else options.max_detections)

    @staticmethod
    def output_names(graph: GraphSpec) -> list[str]:
        return [graph.boxes_name, graph.scores_name, graph.features_name]

    def decode(self, image: bytes | Image.Image, spec: InputSpec, max_pixels: int | None,
               options: Thresholds | None = None) -> tuple[np.ndarray, ImageContext]:
        """An upload -> the letterboxed frame, and where the upright image sits in it (boxes are
        answered in the upright image's pixels, EXIF rotation applied)."""
        upright, full_size = upright_image(image, spec, (spec.width, spec.height), max_pixels)
        fill = spec.fill or (0,) * spec.channels
        # The geometry of the full image: JPEG draft decoding may have shrunk `upright`, and
        # boxes must map back to the pixels that were uploaded.
        with pillow_errors_as_invalid_image():
            pixels, geometry = letterbox(upright, spec.height, spec.width,
                                         fill if spec.channels == 3 else fill[0], full_size)
        return pixels.reshape(spec.shape), ImageContext(geometry, options or self.defaults)

    def tensor_context(self, spec: InputSpec, options: Thresholds | None = None
                       ) -> ImageContext:
        """A tensor row is the frame itself: boxes are answered in its pixels."""
        return ImageContext(letterbox_geometry(spec.width, spec.height, spec.height, spec.width),
                            options or self.defaults)

    def postprocess(self, outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                    contexts: Sequence[ImageContext], models: Sequence[str],
                    processing_ms: Sequence[float]) -> list[DetectionResult]:
        boxes, scores = outputs[graph.boxes_name], outputs[graph.scores_name]
        return [self._answer(boxes[i], scores[i], context, models[i], processing_ms[i])
                for i, context in enumerate(contexts)]

    def _answer(self, boxes: np.ndarray, scores: np.ndarray, context: ImageContext, model: str,
                elapsed_ms: float) -> DetectionResult:
        kept_boxes, kept_scores, class_ids = self.select(boxes, scores, context.thresholds)
        image_boxes = to_image_pixels(kept_boxes, context.letterbox)
        return DetectionResult(
            detections=[DetectedObject(label=self.labels[c], class_id=int(c), score=float(s),
                                       box=[round(float(v), 2) for v in box])
                        for box, s, c in zip(image_boxes, kept_scores, class_ids)],
            width=context.letterbox.width, height=context.letterbox.height, model=model,
            processing_ms=round(elapsed_ms, 3))

    def select(self, boxes: np.ndarray, scores: np.ndarray, thresholds: Thresholds
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One image's dense outputs -> (boxes, scores, class ids) in the frame, best first."""
        return select_detections(boxes, scores, thresholds.confidence, thresholds.iou,
                                 thresholds.max_detections, multi_label=self.spec.multi_label,
                                 nms=self.spec.nms)

    @staticmethod
    def record(answers: Sequence[DetectionResult], seconds: Sequence[float]) -> None:
        """Per model: detections per image, their scores, detections per class, latency."""
        by_class = Counter((a.model, d.label) for a in answers for d in a.detections)
        for (model, label), count in by_class.items():
            metrics.labelled(metrics.detections(), model, label).inc(count)
        for answer, elapsed in zip(answers, seconds):
            model = answer.model
            metrics.labelled(metrics.detections_per_image(), model).observe(len(answer.detections))
            scores = metrics.labelled(metrics.detection_score(), model)
            for detection in answer.detections:
                scores.observe(detection.score)
            metrics.labelled(metrics.processing_seconds(), model).observe(elapsed)

    @staticmethod
    def tensors(outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                answers: Sequence[DetectionResult], contexts: Sequence[ImageContext]
                ) -> list[dict[str, Any]]:
        """Per image: its detections as tensors padded to its request's max_detections (boxes
        and scores 0, labels -1 in the padding), boxes in the image's pixels."""
        rows = []
        for answer, context in zip(answers, contexts):
            size = context.thresholds.max_detections
            boxes = np.zeros((size, 4), np.float32)
            scores = np.zeros(size, np.float32)
            labels = np.full(size, -1, np.int64)
            for i, detection in enumerate(answer.detections[:size]):
                boxes[i], scores[i], labels[i] = detection.box, detection.score, detection.class_id
            rows.append({"boxes": boxes, "scores": scores, "labels": labels,
                         "num_detections": np.int32(min(len(answer.detections), size)),
                         "model": answer.model})
        return rows

    def agreement(self, shadow_outputs: Mapping[str, np.ndarray], graph: GraphSpec,
                  served: Sequence[DetectionResult], contexts: Sequence[ImageContext]
                  ) -> np.ndarray:
        """Per image: did the shadow find the same objects? The same number, each served box
        matched by a shadow box of its class with IoU >= 0.5 (the served image's thresholds)."""
        boxes, scores = shadow_outputs[graph.boxes_name], shadow_outputs[graph.scores_name]
        agree = np.zeros(len(served), dtype=bool)
        for i, (answer, context) in enumerate(zip(served, contexts)):
            mine, _, classes = self.select(boxes[i], scores[i], context.thresholds)
            theirs = to_image_pixels(mine, context.letterbox)
            agree[i] = same_objects(theirs, classes, answer)
        return agree


def same_objects(boxes: np.ndarray, class_ids: np.ndarray, answer: DetectionResult,
                 min_iou: float = 0.5) -> bool:
    """Whether detections (boxes, class ids) pair one-to-one with an answer's, by class and
    IoU (greedy, best first)."""
    if len(boxes) != len(answer.detections):
        return False
    unmatched = list(range(len(boxes)))
    for served in answer.detections:
        candidates = [j for j in unmatched if class_ids[j] == served.class_id]
        if not candidates:
            return False
        ious = [box_iou(np.asarray(served.box), boxes[j]) for j in candidates]
        best = int(np.argmax(ious))
        if ious[best] < min_iou:
            return False
        unmatched.remove(candidates[best])
    return True


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, float(min(a[2], b[2]) - max(a[0], b[0])))
    h = max(0.0, float(min(a[3], b[3]) - max(a[1], b[1])))
    inter = w * h
    union = float((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])) - inter
    return inter / union if union > 0 else 0.0
