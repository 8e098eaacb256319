"""serving/boxes.py: NMS equals torchvision's, letterboxing round-trips boxes, detection selection
keeps its promises (threshold, per-class NMS, top-k, order), and the module stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from serving.boxes import (
    Letterbox,
    batched_nms,
    letterbox,
    letterbox_geometry,
    nms,
    select_detections,
    to_image_pixels,
    to_model_pixels,
)
from tests.helpers import ROOT


def random_boxes(rng: np.random.Generator, n: int, extent: float = 100.0) -> np.ndarray:
    """Boxes that overlap often: centres in a small field, sides 5-40% of it."""
    centres = rng.uniform(0, extent, size=(n, 2))
    sides = rng.uniform(0.05, 0.4, size=(n, 2)) * extent
    return np.concatenate([centres - sides / 2, centres + sides / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_equals_torchvision(seed: int, iou_threshold: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    boxes, scores = random_boxes(rng, n), rng.random(n, dtype=np.float32)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                   iou_threshold).numpy()
    got = nms(boxes, scores, iou_threshold)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_batched_nms_equals_torchvision(seed: int, iou_threshold: float) -> None:
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(1, 400))
    boxes, scores = random_boxes(rng, n), rng.random(n, dtype=np.float32)
    class_ids = rng.integers(0, 5, size=n)
    expected = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                           torch.from_numpy(class_ids), iou_threshold).numpy()
    np.testing.assert_array_equal(batched_nms(boxes, scores, class_ids, iou_threshold), expected)


def test_nms_edge_cases() -> None:
    empty = np.zeros((0, 4), dtype=np.float32)
    assert nms(empty, np.zeros(0, dtype=np.float32), 0.5).tolist() == []
    assert batched_nms(empty, np.zeros(0), np.zeros(0, dtype=np.int64), 0.5).tolist() == []
    # Identical boxes: the better one stays. Degenerate (zero-area) boxes never suppress or get
    # suppressed (0/0 IoU), as in torchvision.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5]], np.float32)
    scores = np.array([0.2, 0.9, 0.5, 0.4], np.float32)
    expected = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.5)
    assert nms(boxes, scores, 0.5).tolist() == expected.tolist() == [1, 2, 3]


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (64, 128), (512, 256), (37, 301),
                                  (100, 100), (50, 20)])
@pytest.mark.parametrize("frame", [(128, 128), (160, 96)])
def test_letterbox_round_trip(size: tuple[int, int], frame: tuple[int, int]) -> None:
    width, height = size
    frame_height, frame_width = frame
    image = Image.new("RGB", size, (200, 10, 10))
    pixels, lb = letterbox(image, frame_height, frame_width, (114, 114, 114))
    assert pixels.shape == (frame_height, frame_width, 3) and pixels.dtype == np.uint8
    # The image fills one side and is centred on the other; the rest is the fill colour.
    assert lb.resized_width == frame_width or lb.resized_height == frame_height
    assert lb.pad_x == (frame_width - lb.resized_width) // 2
    assert lb.pad_y == (frame_height - lb.resized_height) // 2
    assert abs(lb.resized_width / lb.resized_height - width / height) <= (
        width / height) * (1 / lb.resized_width + 1 / lb.resized_height) + 1e-9
    assert tuple(pixels[lb.pad_y + lb.resized_height // 2, lb.pad_x + lb.resized_width // 2]) \
        == (200, 10, 10)
    if lb.pad_x:
        assert tuple(pixels[frame_height // 2, 0]) == (114, 114, 114)
    if lb.pad_y:
        assert tuple(pixels[0, frame_width // 2]) == (114, 114, 114)

    rng = np.random.default_rng(width * 1000 + height)
    xs = np.sort(rng.uniform(0, width, size=(50, 2)), axis=1)
    ys = np.sort(rng.uniform(0, height, size=(50, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float32)
    in_frame = to_model_pixels(boxes, lb)
    assert (in_frame[:, [0, 2]] >= lb.pad_x - 1e-3).all()
    assert (in_frame[:, [0, 2]] <= lb.pad_x + lb.resized_width + 1e-3).all()
    np.testing.assert_allclose(to_image_pixels(in_frame, lb), boxes, atol=0.5)


def test_letterbox_maps_an_object_to_where_the_model_sees_it() -> None:
    """A white square drawn in the image lands, after letterboxing, where to_model_pixels says."""
    image = Image.new("RGB", (400, 200), (0, 0, 0))
    image.paste((255, 255, 255), (100, 40, 180, 120))  # x1, y1, x2, y2 = 100, 40, 180, 120
    pixels, lb = letterbox(image, 128, 128, (0, 0, 0))
    x1, y1, x2, y2 = to_model_pixels(np.array([[100, 40, 180, 120]]), lb)[0]
    bright = np.argwhere(pixels[..., 0] >= 128)
    assert abs(bright[:, 1].min() - x1) <= 1 and abs(bright[:, 1].max() + 1 - x2) <= 1
    assert abs(bright[:, 0].min() - y1) <= 1 and abs(bright[:, 0].max() + 1 - y2) <= 1


def test_to_image_pixels_clips_to_the_image() -> None:
    lb = letterbox_geometry(200, 100, 128, 128)  # 128 x 64 inside, padded 32 above and below
    assert (lb.pad_x, lb.pad_y, lb.resized_width, lb.resized_height) == (0, 32, 128, 64)
    boxes = np.array([[-10, 0, 140, 128], [10, 40, 20, 50]], dtype=np.float32)
    mapped = to_image_pixels(boxes, lb)
    np.testing.assert_allclose(mapped[0], [0, 0, 200, 100])
    np.testing.assert_allclose(mapped[1], [10 * 200 / 128, 8 * 100 / 64, 20 * 200 / 128,
                                           18 * 100 / 64], rtol=1e-6)


def test_letterbox_grey_image() -> None:
    pixels, lb = letterbox(Image.new("L", (30, 60), 255), 64, 64, 0)
    assert pixels.shape == (64, 64, 1) and isinstance(lb, Letterbox)
    assert (lb.resized_width, lb.resized_height, lb.pad_x, lb.pad_y) == (32, 64, 16, 0)


def dense_predictions(rng: np.random.Generator, locations: int = 2000, classes: int = 10):
    boxes = random_boxes(rng, locations, extent=128.0)
    scores = rng.random((locations, classes), dtype=np.float32) ** 8  # mostly low, like sigmoids
    return boxes, scores


@pytest.mark.parametrize("seed", range(5))
def test_select_detections_threshold_topk_and_order(seed: int) -> None:
    boxes, scores = dense_predictions(np.random.default_rng(seed))
    kept_boxes, kept_scores, class_ids = select_detections(boxes, scores, 0.3, 0.5, 25)
    assert kept_boxes.dtype == np.float32 and kept_scores.dtype == np.float32
    assert class_ids.dtype == np.int64
    assert len(kept_boxes) == len(kept_scores) == len(class_ids) == 25
    assert (kept_scores > 0.3).all()
    assert (np.diff(kept_scores) <= 0).all()
    # Every detection is a real (location, class) prediction.
    for box, score, class_id in zip(kept_boxes, kept_scores, class_ids):
        location = np.flatnonzero((boxes == box).all(axis=1))
        assert len(location) >= 1 and scores[location[0], class_id] == score
    # And they are exactly torchvision's batched_nms over the candidates, truncated to 25.
    locations, classes = np.nonzero(scores > 0.3)
    candidate_scores = scores[locations, classes]
    expected = torchvision.ops.batched_nms(
        torch.from_numpy(boxes[locations]), torch.from_numpy(candidate_scores),
        torch.from_numpy(classes), 0.5)[:25].numpy()
    np.testing.assert_array_equal(kept_scores, candidate_scores[expected])
    np.testing.assert_array_equal(class_ids, classes[expected])


def test_select_detections_is_multi_label_and_nms_is_per_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.1], [0.01, 0.6]], dtype=np.float32)
    kept_boxes, kept_scores, class_ids = select_detections(boxes, scores, 0.5, 0.5, 10)
    # Location 0 is both class 0 and class 1; location 1 (class 0) overlaps location 0 and goes.
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert class_ids.tolist() == [0, 1, 1]
    np.testing.assert_array_equal(kept_boxes, boxes[[0, 0, 2]])


def test_select_detections_class_agnostic_keeps_one_label_per_object() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([[0.9, 0.8], [0.7, 0.1], [0.01, 0.6]], dtype=np.float32)
    _, kept_scores, class_ids = select_detections(boxes, scores, 0.5, 0.5, 10,
                                                  class_agnostic_iou=0.7)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.6])
    assert class_ids.tolist() == [0, 1]
    # max_detections still caps the answer after the second pass.
    assert len(select_detections(boxes, scores, 0.5, 0.5, 1, class_agnostic_iou=0.7)[0]) == 1


def test_select_detections_nothing_above_threshold() -> None:
    boxes, scores = dense_predictions(np.random.default_rng(0), 100)
    kept_boxes, kept_scores, class_ids = select_detections(boxes, scores, 1.0, 0.5, 10)
    assert kept_boxes.shape == (0, 4) and kept_scores.shape == (0,) and class_ids.shape == (0,)


def test_select_detections_caps_candidates_before_nms() -> None:
    """With every pair over the threshold, only the best max_candidates reach NMS."""
    boxes, scores = dense_predictions(np.random.default_rng(1), 4000)
    _, kept_scores, _ = select_detections(boxes, scores, 0.0, 0.5, 10_000, max_candidates=50)
    assert len(kept_scores) <= 50
    assert kept_scores.min() >= np.sort(scores.ravel())[-50]


def test_boxes_does_not_import_torch() -> None:
    code = ("import sys, serving.boxes; "
            "sys.exit(any(m.split('.')[0] in ('torch', 'torchvision') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr or "serving.boxes imported torch"
