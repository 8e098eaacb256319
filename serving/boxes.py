"""Detection post-processing, in numpy: letterbox an upload to the model's fixed input, turn the
graph's dense per-location predictions into a short list of detections, and map their boxes
back to the upload's pixels.

The one implementation used by the service, the offline client, the tests and the detector's
evaluation in train_export/detection, so that the mAP measured at training time is the mAP of
the served path. No torch here: serving stays torch-free.

Boxes are x1, y1, x2, y2 floats with pixel *edges* as coordinates (a box covering columns 3..7
has x1 = 3, x2 = 8), the convention under which Pillow's resize maps coordinates linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Candidates kept before NMS, by score: NMS costs O(candidates x kept) and the few thousand
# (location, class) pairs over a low threshold are mostly duplicates of the same few objects.
# torchvision's FCOS and RetinaNet cap at 1000 too.
MAX_CANDIDATES = 1000


@dataclass(frozen=True)
class Letterbox:
    """How an image of `width` x `height` was placed in the model's input frame.

    `scale` is the nominal factor min(frame / image) on both axes; the resized image is rounded
    to whole pixels, so the exact per-axis factors are `scale_x` and `scale_y`, which is what
    `to_image_pixels` undoes (exactly, not to within a pixel of rounding).
    """

    scale: float
    pad_x: int
    pad_y: int
    width: int  # of the original image
    height: int
    resized_width: int  # of the image inside the frame, before padding
    resized_height: int

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.width

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.height


def letterbox_geometry(width: int, height: int, frame_height: int, frame_width: int) -> Letterbox:
    """Where an image goes in the frame: resized keeping its aspect ratio, centered."""
    scale = min(frame_width / width, frame_height / height)
    resized_width = min(frame_width, max(1, round(width * scale)))
    resized_height = min(frame_height, max(1, round(height * scale)))
    return Letterbox(scale=scale,
                     pad_x=(frame_width - resized_width) // 2,
                     pad_y=(frame_height - resized_height) // 2,
                     width=width, height=height,
                     resized_width=resized_width, resized_height=resized_height)


def letterbox(image: Image.Image, height: int, width: int, fill: int | tuple[int, ...],
              size: tuple[int, int] | None = None) -> tuple[np.ndarray, Letterbox]:
    """`image` resized (Pillow bilinear) to fit height x width keeping its aspect ratio, pasted
    centered on a canvas of colour `fill`; returns uint8 (height, width, C) and the geometry.

    `size` (width, height): the full image's size, when `image` is a reduced decode of it (a
    JPEG decoded at 1/2, 1/4 or 1/8 scale): the geometry, and so the boxes mapped back, are then
    in the full image's pixels.

    Centered rather than top-left: the model sees the same amount of padding on both sides, so
    nothing it learns depends on which edge of the frame the image touches.
    """
    full_width, full_height = size or image.size
    geometry = letterbox_geometry(full_width, full_height, height, width)
    resized = image
    if (geometry.resized_width, geometry.resized_height) != image.size:
        resized = image.resize((geometry.resized_width, geometry.resized_height),
                               Image.Resampling.BILINEAR)
    canvas = Image.new(image.mode, (width, height), fill)
    canvas.paste(resized, (geometry.pad_x, geometry.pad_y))
    pixels = np.asarray(canvas, dtype=np.uint8)
    return pixels.reshape(height, width, -1), geometry


def to_model_pixels(boxes_xyxy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Image pixels -> the letterboxed frame's pixels (training targets; the inverse below)."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    factor = np.array([lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y])
    offset = np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], dtype=np.float64)
    mapped: np.ndarray = (boxes * factor + offset).astype(np.float32)
    return mapped


def to_image_pixels(boxes_xyxy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """The frame's pixels -> the original image's: undo padding and scale, clip to the image."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    factor = np.array([lb.scale_x, lb.scale_y, lb.scale_x, lb.scale_y])
    offset = np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], dtype=np.float64)
    limit = np.array([lb.width, lb.height, lb.width, lb.height], dtype=np.float64)
    mapped: np.ndarray = np.clip((boxes - offset) / factor, 0.0, limit).astype(np.float32)
    return mapped


def box_area(boxes: np.ndarray) -> np.ndarray:
    area: np.ndarray = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return area


def _iou_one_to_many(box: np.ndarray, area: np.ndarray, boxes: np.ndarray,
                     areas: np.ndarray) -> np.ndarray:
    """IoU of one box with many, computed as torchvision's CPU kernel does (same operations in
    the boxes' dtype), so that results agree at the threshold too."""
    w = np.maximum(0, np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]))
    h = np.maximum(0, np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 for empty boxes: NaN, kept
        iou: np.ndarray = inter / (area + areas - inter)
    return iou


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray | None,
                iou_threshold: float, limit: int | None = None) -> np.ndarray:
    """Visit boxes by decreasing score; keep a box unless a kept box *of its class* overlaps it
    with IoU > iou_threshold. Per-class NMS in one pass: classes never interact, so this keeps
    exactly what NMS class by class keeps, already in score order, and can stop after `limit`
    boxes are kept (the rest could only come after them)."""
    boxes = np.asarray(boxes)
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-np.asarray(scores), kind="stable")
    areas = box_area(boxes)
    keep: list[int] = []
    # Loop over the *kept* boxes only, each removing what it suppresses from those left.
    while order.size and (limit is None or len(keep) < limit):
        best, rest = order[0], order[1:]
        keep.append(int(best))
        iou = _iou_one_to_many(boxes[best], areas[best], boxes[rest], areas[rest])
        suppressed = iou > iou_threshold  # NaN (0/0) is not > threshold: kept, as in torch
        if class_ids is not None:
            suppressed &= class_ids[rest] == class_ids[best]
        order = rest[~suppressed]
    return np.array(keep, dtype=np.int64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, torchvision.ops.nms's semantics: visit boxes by
    decreasing score, keep a box unless a kept box overlaps it with IoU > iou_threshold.

    Returns the kept indices (int64) by decreasing score. Equal scores keep input order.
    """
    return _greedy_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray,
                iou_threshold: float) -> np.ndarray:
    """NMS within each class independently (torchvision.ops.batched_nms's results), kept
    indices by decreasing score.

    Boxes of other classes are masked out of each comparison instead of torchvision's
    coordinate-offset trick: the offsets shift float32 boxes by thousands of pixels, which can
    change an IoU in its last bits.
    """
    return _greedy_nms(boxes, scores, np.asarray(class_ids), iou_threshold)


def select_detections(boxes: np.ndarray, scores: np.ndarray, confidence_threshold: float,
                      iou_threshold: float, max_detections: int,
                      max_candidates: int = MAX_CANDIDATES,
                      class_agnostic_iou: float | None = None,
                      multi_label: bool = True, nms: bool = True,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's dense predictions -> its detections.

    Args:
        boxes: (A, 4) x1, y1, x2, y2 per location.
        scores: (A, K) per-class scores in [0, 1].
        confidence_threshold: (location, class) pairs scoring above it are candidates; a
            location may propose several classes (multi-label, like torchvision's FCOS).
        iou_threshold: per-class NMS threshold.
        max_detections: at most this many detections are returned.
        max_candidates: the best this many candidates go to NMS.
        class_agnostic_iou: if set, a second NMS over all classes at this IoU drops the
            lower-scoring labels of one object (multi-label keeps "8" and "9" for an ambiguous
            digit, which AP rewards and a person reading the answer may not want).
        multi_label: False: only each location's best class is a candidate (DETR's
            post-processing: one object per query).
        nms: False: no suppression, only the threshold and the top max_detections (for models
            whose outputs do not repeat an object, such as DETR).

    Returns:
        boxes float32 (M, 4), scores float32 (M,), class_ids int64 (M,), by decreasing score.
    """
    scores = np.asarray(scores)
    if multi_label:
        locations, classes = np.nonzero(scores > confidence_threshold)
    else:
        best_class = scores.argmax(axis=1)
        locations = np.flatnonzero(scores[np.arange(len(scores)), best_class]
                                   > confidence_threshold)
        classes = best_class[locations]
    candidate_scores = scores[locations, classes]
    if len(candidate_scores) > max_candidates:
        best = np.argpartition(-candidate_scores, max_candidates - 1)[:max_candidates]
        locations, classes = locations[best], classes[best]
        candidate_scores = candidate_scores[best]
    candidate_boxes = np.asarray(boxes)[locations]
    if not nms:
        keep = np.argsort(-candidate_scores, kind="stable")[:max_detections]
    elif class_agnostic_iou is None:
        # batched_nms(...)[:max_detections], stopping as soon as max_detections are kept.
        keep = _greedy_nms(candidate_boxes, candidate_scores, classes, iou_threshold,
                           max_detections)
    else:
        keep = batched_nms(candidate_boxes, candidate_scores, classes, iou_threshold)
        keep = keep[_greedy_nms(candidate_boxes[keep], candidate_scores[keep], None,
                                class_agnostic_iou, max_detections)]
    return (candidate_boxes[keep].astype(np.float32, copy=False),
            candidate_scores[keep].astype(np.float32, copy=False),
            classes[keep].astype(np.int64))
