"""Held-out evaluation of the detector with pycocotools' COCOeval, through the served path:
original canvas -> serving.boxes.letterbox -> graph -> serving.boxes.select_detections ->
serving.boxes.to_image_pixels.

`detect` takes any graph runner (the eager wrapper, or an ONNX Runtime session via
`onnx_runner`), so the exported graph can be scored exactly as the eager one.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.boxes import select_detections, to_image_pixels

from .model import DetectorInput, to_frame
from .scenes import LABELS, Scene

# uint8 (N, S, S, C) -> (boxes (N, A, 4), scores (N, A, K)) in frame pixels.
GraphRunner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Thresholds:
    # Low, as COCO evaluation wants (AP integrates over all recall); serving may use more.
    confidence_threshold: float = 0.05
    # Per-class NMS: the heatmap's neighbouring cells predict near-identical boxes (IoU > 0.6);
    # touching digits of one class overlap far less.
    iou_threshold: float = 0.5
    # Scenes hold at most 8 digits; COCO scores up to 100 detections per image.
    max_detections: int = 100


@dataclass
class Detections:
    boxes: np.ndarray  # float32 (M, 4), x1, y1, x2, y2 in the image's pixels
    scores: np.ndarray  # float32 (M,)
    class_ids: np.ndarray  # int64 (M,)


def eager_runner(wrapper) -> GraphRunner:
    """The torch serving wrapper as a runner (torch imported only here)."""
    import torch

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            boxes, scores, _ = wrapper(torch.from_numpy(pixels))
        return boxes.numpy(), scores.numpy()

    return run


def onnx_runner(session, input_name: str = "pixels", boxes_name: str = "boxes",
                scores_name: str = "scores") -> GraphRunner:
    """An onnxruntime.InferenceSession of the exported wrapper as a runner."""

    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = session.run([boxes_name, scores_name], {input_name: pixels})
        return boxes, scores

    return run


def detect(run: GraphRunner, images: Sequence[np.ndarray], spec: DetectorInput,
           thresholds: Thresholds = Thresholds(), batch_size: int = 64) -> list[Detections]:
    """Detections in each image's own pixels, by the served path, `batch_size` images a run."""
    results = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        frames, geometries = zip(*(to_frame(image, spec) for image in batch))
        boxes, scores = run(np.stack(frames))
        for image_boxes, image_scores, lb in zip(boxes, scores, geometries):
            kept_boxes, kept_scores, class_ids = select_detections(
                image_boxes, image_scores, thresholds.confidence_threshold,
                thresholds.iou_threshold, thresholds.max_detections)
            results.append(Detections(to_image_pixels(kept_boxes, lb), kept_scores, class_ids))
    return results


def coco_ground_truth(scenes: Sequence[Scene], labels: Sequence[str] = LABELS) -> dict:
    """Scenes as a COCO dataset dict: image i has id i + 1, class c is category c + 1."""
    images: list[dict] = []
    annotations: list[dict] = []
    for i, scene in enumerate(scenes):
        images.append({"id": i + 1, "width": scene.width, "height": scene.height})
        for box, class_id in zip(scene.boxes, scene.class_ids):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(class_id) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": c + 1, "name": name} for c, name in enumerate(labels)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(detections: Sequence[Detections]) -> list[dict]:
    return [{"image_id": i + 1, "category_id": int(c) + 1,
             "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
             "score": float(s)}
            for i, d in enumerate(detections)
            for b, s, c in zip(d.boxes, d.scores, d.class_ids)]


def coco_map(scenes: Sequence[Scene], detections_per_scene: Sequence[Detections],
             labels: Sequence[str] = LABELS) -> dict:
    """COCOeval (bbox) of detections against the scenes' ground truth, quietly.

    Returns {"map_50": AP@0.5, "map_50_95": AP@[.5:.95], "per_class": {label: {"ap_50",
    "ap_50_95"}}, "images", "digits", "detections"}, all over maxDets=100 and all areas.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(scenes) != len(detections_per_scene):
        raise ValueError(f"{len(scenes)} scenes but {len(detections_per_scene)} detection lists")
    results = coco_results(detections_per_scene)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        truth = COCO()
        truth.dataset = coco_ground_truth(scenes, labels)
        truth.createIndex()
        # loadRes refuses an empty list; no detection at all scores 0 everywhere.
        predicted = truth.loadRes(results) if results else COCO()
        if not results:
            predicted.dataset = {"images": truth.dataset["images"], "annotations": [],
                                 "categories": truth.dataset["categories"]}
            predicted.createIndex()
        evaluation = COCOeval(truth, predicted, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # precision: [IoU thresholds (.5:.95), recall points, classes, areas (all first),
    # maxDets (100 last)]; -1 where a class has no ground truth.
    precision = evaluation.eval["precision"][:, :, :, 0, -1]

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else float("nan")

    per_class = {label: {"ap_50": round(mean_valid(precision[0, :, c]), 4),
                         "ap_50_95": round(mean_valid(precision[:, :, c]), 4)}
                 for c, label in enumerate(labels)}
    return {
        "map_50": round(float(evaluation.stats[1]), 4),
        "map_50_95": round(float(evaluation.stats[0]), 4),
        "per_class": per_class,
        "images": len(scenes),
        "digits": int(sum(len(s.boxes) for s in scenes)),
        "detections": len(results),
    }


def evaluate_detector(trained, thresholds: Thresholds = Thresholds(),
                      run: GraphRunner | None = None) -> dict:
    """coco_map of a TrainedDetector on its held-out scenes (eager wrapper unless `run`)."""
    run = run or eager_runner(trained.wrapper)
    detections = detect(run, [scene.image for scene in trained.heldout], trained.input,
                        thresholds)
    return coco_map(trained.heldout, detections, trained.labels)
