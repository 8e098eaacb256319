"""The detection task (serving/detection.py) without a server: options, letterbox decoding with
EXIF rotation and JPEG draft decoding, per-image thresholds in one batch, and shadow agreement."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.contract import DetectionSpec, GraphSpec, InputSpec
from serving.detection import Detection, ImageContext, InvalidOption, Thresholds, same_objects
from serving.schemas import DetectedObject, DetectionResult
from serving.settings import DetectionSettings

SPEC = InputSpec(height=64, width=64, channels=3, color_mode="RGB", mean=(0.5,) * 3,
                 std=(0.25,) * 3, fit="letterbox", fill=(114, 114, 114))
GRAPH = GraphSpec(feature_dim=4)
LABELS = ["cat", "dog"]


def task() -> Detection:
    return Detection(LABELS, DetectionSpec(), DetectionSettings(confidence_threshold=0.5))


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_options_fall_back_to_the_defaults_field_by_field() -> None:
    assert task().options({}) == Thresholds(0.5, 0.5, 100)
    assert task().options({"confidence_threshold": "0.25", "max_detections": "3"}) == \
        Thresholds(0.25, 0.5, 3)
    assert task().options({"iou_threshold": "", "unrelated": "x"}) == Thresholds(0.5, 0.5, 100)


@pytest.mark.parametrize("fields", [{"confidence_threshold": "1.5"}, {"iou_threshold": "-0.1"},
                                    {"max_detections": "0"}, {"max_detections": "1001"},
                                    {"max_detections": "2.5"}, {"confidence_threshold": "high"}])
def test_an_invalid_option_is_refused_with_its_name(fields: dict[str, str]) -> None:
    with pytest.raises(InvalidOption) as caught:
        task().options(fields)
    assert next(iter(fields)) in str(caught.value) and caught.value.code == "invalid_option"


def test_decode_letterboxes_and_keeps_the_full_image_geometry() -> None:
    image = Image.new("RGB", (200, 100), (10, 200, 30))
    pixels, context = task().decode(encoded(image, "PNG"), SPEC, None, Thresholds(0.1, 0.5, 5))
    assert pixels.shape == (64, 64, 3)
    assert (context.letterbox.width, context.letterbox.height) == (200, 100)
    assert context.letterbox.pad_y == 16 and tuple(pixels[0, 0]) == (114, 114, 114)
    assert tuple(pixels[32, 32]) == (10, 200, 30)
    assert context.thresholds == Thresholds(0.1, 0.5, 5)


def test_a_large_jpeg_decoded_at_reduced_scale_still_maps_to_its_full_size() -> None:
    image = Image.new("RGB", (1600, 800), (250, 250, 250))
    _, context = task().decode(encoded(image, "JPEG"), SPEC, None)
    assert (context.letterbox.width, context.letterbox.height) == (1600, 800)
    frame_box = np.array([[0.0, 16.0, 64.0, 48.0]])  # the whole image inside the frame
    from serving.boxes import to_image_pixels

    np.testing.assert_allclose(to_image_pixels(frame_box, context.letterbox),
                               [[0, 0, 1600, 800]], atol=1e-3)


def test_exif_rotation_is_applied_before_the_geometry() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait (rotated 90 degrees)
    stored = Image.new("RGB", (120, 60), (0, 0, 0))
    _, context = task().decode(encoded(stored, "JPEG", exif=exif), SPEC, None)
    assert (context.letterbox.width, context.letterbox.height) == (60, 120)


def outputs(boxes: list[list[float]], scores: list[list[float]]) -> dict[str, np.ndarray]:
    return {GRAPH.boxes_name: np.array([boxes], np.float32),
            GRAPH.scores_name: np.array([scores], np.float32)}


def test_each_image_uses_its_own_thresholds_in_one_batch() -> None:
    detector = task()
    boxes = [[0, 0, 32, 32], [32, 32, 64, 64], [0, 0, 31, 31]]
    scores = [[0.9, 0.0], [0.0, 0.6], [0.8, 0.0]]  # the third overlaps the first: NMS drops it
    both = {name: np.concatenate([v, v]) for name, v in outputs(boxes, scores).items()}
    frame = detector.tensor_context(SPEC, Thresholds(0.5, 0.5, 100))
    strict = detector.tensor_context(SPEC, Thresholds(0.7, 0.5, 100))
    answers = detector.postprocess(both, GRAPH, [frame, strict], ["m:1", "m:1"], [1.0, 2.0])
    assert [d.label for d in answers[0].detections] == ["cat", "dog"]
    assert [d.label for d in answers[1].detections] == ["cat"]
    assert answers[0].detections[0].box == [0.0, 0.0, 32.0, 32.0]
    assert (answers[0].width, answers[0].height) == (64, 64)


def test_max_detections_keeps_the_best() -> None:
    detector = task()
    answer = detector.postprocess(outputs([[0, 0, 10, 10], [40, 40, 60, 60]],
                                          [[0.6, 0.0], [0.0, 0.95]]), GRAPH,
                                  [detector.tensor_context(SPEC, Thresholds(0.5, 0.5, 1))],
                                  ["m:1"], [1.0])[0]
    assert [d.label for d in answer.detections] == ["dog"]


def test_the_shadow_agrees_when_it_finds_the_same_objects() -> None:
    served = DetectionResult(detections=[DetectedObject(label="cat", class_id=0, score=0.9,
                                                        box=[0, 0, 32, 32])],
                             width=64, height=64, model="m:1", processing_ms=1.0)
    assert same_objects(np.array([[1, 1, 32, 32]], np.float32), np.array([0]), served)
    assert not same_objects(np.array([[1, 1, 32, 32]], np.float32), np.array([1]), served)
    assert not same_objects(np.zeros((0, 4), np.float32), np.zeros(0, int), served)
    detector = task()
    context = ImageContext(detector.tensor_context(SPEC).letterbox, Thresholds(0.5, 0.5, 10))
    agree = detector.agreement(outputs([[0, 0, 32, 32]], [[0.8, 0.1]]), GRAPH, [served],
                               [context])
    assert agree.tolist() == [True]
