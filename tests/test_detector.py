"""The object detector end to end, against a real `bentoml serve service:ObjectDetector` (the
`detector_server` fixture) serving the detector the real CLI trained in this session: COCO mAP of
the served answers on held-out scenes uploaded as PNG and JPEG, per-request thresholds (alone
and mixed in one batch), EXIF rotation, the tensor route, /model_info, /metrics, /drift, jobs,
and the shared refusals."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.boxes import letterbox, to_model_pixels
from tests.helpers import RunningServer, metric_total, wait_for_job
from train_export.detection.evaluate import Detections, coco_map
from train_export.detection.scenes import LABELS, Scene, heldout_scenes

pytestmark = pytest.mark.e2e

EVALUATION_SCENES = 240  # held-out scenes of every size, aspect and digit count
REQUEST_IMAGES = 4


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return heldout_scenes(EVALUATION_SCENES, seed=0)


def encode(image: np.ndarray | Image.Image, fmt: str, **save: Any) -> bytes:
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **save)
    return buffer.getvalue()


def upload(index: int, scene: Scene) -> tuple[str, tuple[str, bytes, str]]:
    """Even scenes as PNG, odd ones as JPEG (quality 90), the way users send them."""
    if index % 2 == 0:
        return ("images", (f"scene{index}.png", encode(scene.image, "PNG"), "image/png"))
    return ("images", (f"scene{index}.jpg", encode(scene.image, "JPEG", quality=90),
                       "image/jpeg"))


def detect(url: str, files: Sequence[tuple[str, tuple[str, bytes, str]]],
           client: httpx.Client | None = None, **options: Any) -> httpx.Response:
    data = {name: str(value) for name, value in options.items()}
    return (client or httpx).post(f"{url}/detect", files=list(files), data=data, timeout=120)


def as_detections(answer: dict[str, Any]) -> Detections:
    found = answer["detections"]
    return Detections(np.array([d["box"] for d in found], np.float32).reshape(-1, 4),
                      np.array([d["score"] for d in found], np.float32),
                      np.array([d["class_id"] for d in found], np.int64))


def test_served_answers_reach_the_map_target_on_held_out_scenes(
        detector_server: RunningServer, scenes: list[Scene]) -> None:
    chunks = [list(range(i, min(i + REQUEST_IMAGES, len(scenes))))
              for i in range(0, len(scenes), REQUEST_IMAGES)]

    def ask(indices: list[int]) -> list[dict[str, Any]]:
        response = detect(detector_server.url, [upload(i, scenes[i]) for i in indices],
                          confidence_threshold=0.05)  # low, as COCO evaluation wants
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(8) as pool:
        answers = [a for chunk in pool.map(ask, chunks) for a in chunk]
    assert [(a["width"], a["height"]) for a in answers] == [(s.width, s.height) for s in scenes]
    for answer in answers:
        scores = [d["score"] for d in answer["detections"]]
        assert scores == sorted(scores, reverse=True), "detections sorted by score"
    result = coco_map(scenes, [as_detections(a) for a in answers], LABELS)
    assert result["map_50"] >= 0.90, f"served mAP@0.5 {result['map_50']} on {len(scenes)} scenes"
    print(f"served mAP@0.5 {result['map_50']}, mAP@[.5:.95] {result['map_50_95']} "
          f"({result['images']} scenes, {result['digits']} digits)")


def busiest(scenes: list[Scene]) -> tuple[int, Scene]:
    index = max(range(len(scenes)), key=lambda i: len(scenes[i].boxes))
    return index, scenes[index]


def test_thresholds_change_the_answer_as_asked(detector_server: RunningServer,
                                               scenes: list[Scene]) -> None:
    index, scene = busiest(scenes)
    files = [upload(2 * index, scene)]  # as PNG

    def found(**options: Any) -> list[dict[str, Any]]:
        response = detect(detector_server.url, files, **options)
        assert response.status_code == 200, response.text
        return response.json()[0]["detections"]

    loose, strict = found(confidence_threshold=0.05), found(confidence_threshold=0.8)
    assert len(strict) < len(loose)
    assert all(d["score"] > 0.8 for d in strict)
    assert len(found(confidence_threshold=0.05, max_detections=2)) == 2
    assert found(confidence_threshold=0.05, max_detections=2) == loose[:2]
    no_suppression = found(confidence_threshold=0.05, iou_threshold=1.0)
    assert len(no_suppression) > len(loose), "IoU threshold 1 suppresses nothing"
    assert found() == found(confidence_threshold=0.5, iou_threshold=0.5, max_detections=100), \
        "no field: the configured defaults"


def test_one_requests_thresholds_never_change_anothers_answers(
        detector_server: RunningServer, scenes: list[Scene]) -> None:
    index, scene = busiest(scenes)
    files = [upload(2 * index, scene)]
    settings = [{"confidence_threshold": 0.05}, {"confidence_threshold": 0.9},
                {"max_detections": 1}, {"iou_threshold": 1.0, "confidence_threshold": 0.2}]
    alone = [detect(detector_server.url, files, **s).json()[0]["detections"] for s in settings]
    with httpx.Client(limits=httpx.Limits(max_connections=32)) as client, \
            ThreadPoolExecutor(32) as pool:
        # 32 requests at once, the four settings interleaved: they share batches.
        mixed = list(pool.map(lambda k: detect(detector_server.url, files, client,
                                                **settings[k % 4]), range(32)))
    for k, response in enumerate(mixed):
        assert response.status_code == 200, response.text
        together = response.json()[0]["detections"]
        expected = alone[k % 4]
        assert [d["class_id"] for d in together] == [d["class_id"] for d in expected], \
            settings[k % 4]
        for got, want in zip(together, expected):  # a batch's size may change the last bits
            assert abs(got["score"] - want["score"]) < 1e-4
            assert np.abs(np.subtract(got["box"], want["box"])).max() < 0.05


@pytest.mark.parametrize("options", [{"confidence_threshold": 1.5}, {"iou_threshold": -0.2},
                                     {"max_detections": 0}, {"max_detections": 1001},
                                     {"max_detections": "many"}, {"confidence_threshold": ""},
                                     ])
def test_an_invalid_threshold_is_a_422_with_its_name(detector_server: RunningServer,
                                                     scenes: list[Scene],
                                                     options: dict[str, Any]) -> None:
    response = detect(detector_server.url, [upload(0, scenes[0])], **options)
    if options == {"confidence_threshold": ""}:  # an empty field is the default, not an error
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "invalid_option" and next(iter(options)) in body["detail"]


def test_boxes_are_in_the_pixels_of_the_upright_image(detector_server: RunningServer,
                                                      scenes: list[Scene]) -> None:
    """A phone photo: pixels stored sideways, EXIF orientation 6 says turn them to display."""
    index, scene = busiest(scenes)
    stored = Image.fromarray(scene.image).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = ("images", ("photo.jpg", encode(stored, "JPEG", quality=95, exif=exif),
                           "image/jpeg"))
    upright = detect(detector_server.url, [upload(2 * index, scene)]).json()[0]
    rotated = detect(detector_server.url, [sideways]).json()[0]
    assert (rotated["width"], rotated["height"]) == (scene.width, scene.height)
    assert [d["class_id"] for d in rotated["detections"]] == \
        [d["class_id"] for d in upright["detections"]]
    for a, b in zip(rotated["detections"], upright["detections"]):
        assert np.abs(np.subtract(a["box"], b["box"])).max() < 3.0, "same place, upright"


def test_the_tensor_route_answers_in_the_frames_pixels(detector_server: RunningServer,
                                                       scenes: list[Scene]) -> None:
    info = httpx.post(f"{detector_server.url}/model_info", json={}).json()
    spec = info["input"]
    index, scene = busiest(scenes)
    frame, geometry = letterbox(Image.fromarray(scene.image), spec["height"], spec["width"],
                                tuple(spec["fill"]))
    response = httpx.post(f"{detector_server.url}/detect_tensor",
                          json={"pixels": [frame.tolist()], "max_detections": 3}, timeout=60)
    assert response.status_code == 200, response.text
    tensor = response.json()[0]
    assert (tensor["width"], tensor["height"]) == (spec["width"], spec["height"])
    assert len(tensor["detections"]) == 3
    uploaded = detect(detector_server.url, [upload(2 * index, scene)],
                      max_detections=3).json()[0]["detections"]
    in_frame = to_model_pixels(np.array([d["box"] for d in uploaded]), geometry)
    np.testing.assert_allclose([d["box"] for d in tensor["detections"]], in_frame, atol=0.05)
    bad = httpx.post(f"{detector_server.url}/detect_tensor", json={"pixels": [[1, 2], [3, 4]]})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_tensor"
    bad = httpx.post(f"{detector_server.url}/detect_tensor",
                     json={"pixels": [frame.tolist()], "iou_threshold": 7})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_option"


def test_model_info_reports_accuracy_parity_and_defaults(detector_server: RunningServer,
                                                         trained_detector: str) -> None:
    info = httpx.post(f"{detector_server.url}/model_info", json={}).json()
    assert info["tag"] == trained_detector and info["task"] == "detection"
    assert info["labels"] == LABELS
    assert info["accuracy"]["map_50"] >= 0.90 and 0 < info["accuracy"]["map_50_95"] <= 1
    assert set(info["class_ap"]) == set(LABELS)
    assert info["parity"]["max_box_diff_px"] <= 0.5 and info["parity"]["max_score_diff"] <= 1e-4
    assert info["input"]["fit"] == "letterbox"
    assert info["detection"] == {"confidence_threshold": 0.5, "iou_threshold": 0.5,
                                 "max_detections": 100}


def test_metrics_count_the_detections_answered(detector_server: RunningServer,
                                               scenes: list[Scene], trained_detector: str) -> None:
    def totals() -> tuple[float, float, float]:
        text = httpx.get(f"{detector_server.url}/metrics").text
        return (metric_total(text, "image_classifier_detections_per_image_count",
                             model=trained_detector),
                metric_total(text, "image_classifier_detections_total", model=trained_detector),
                metric_total(text, "image_classifier_detection_score_count",
                             model=trained_detector))

    before = totals()
    answers = [a for i in range(3) for a in
               detect(detector_server.url, [upload(i, scenes[i]) for i in range(3)]).json()]
    after = totals()
    found = sum(len(a["detections"]) for a in answers)
    assert after[0] - before[0] == len(answers)
    assert after[1] - before[1] == found and after[2] - before[2] == found


def test_drift_is_tested_on_the_detectors_features(detector_server: RunningServer,
                                                   trained_detector: str) -> None:
    report = httpx.post(f"{detector_server.url}/drift", json={"test_now": True}).json()
    assert report["enabled"] and [m["model"] for m in report["models"]] == [trained_detector]
    assert report["models"][0]["reference_size"] > 0


def test_a_job_answers_each_file_in_order_with_the_requests_thresholds(
        detector_server: RunningServer, scenes: list[Scene]) -> None:
    files = [upload(0, scenes[0]), ("images", ("broken.png", b"not an image", "image/png")),
             upload(1, scenes[1])]
    submitted = httpx.post(f"{detector_server.url}/detect_batch/submit", files=files,
                           data={"confidence_threshold": "0.7"}, timeout=60)
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    assert wait_for_job(detector_server.url, task_id, route="/detect_batch") == "completed"
    items = httpx.get(f"{detector_server.url}/detect_batch/get",
                      params={"task_id": task_id}).json()
    assert [i["file"] for i in items] == ["scene0.png", "broken.png", "scene1.jpg"]
    assert items[1]["error"] == "invalid_image" and items[1]["result"] is None
    direct = detect(detector_server.url, [files[0], files[2]], confidence_threshold=0.7).json()
    for item, answer in zip([items[0], items[2]], direct):
        assert [d["class_id"] for d in item["result"]["detections"]] == \
            [d["class_id"] for d in answer["detections"]]


def test_the_detector_shares_the_services_refusals(detector_server: RunningServer,
                                                   scenes: list[Scene]) -> None:
    url = detector_server.url
    cases = [
        (detect(url, [("images", ("a.png", b"garbage", "image/png"))]), 400, "invalid_image"),
        (httpx.post(f"{url}/detect", content=b"x", headers={"Content-Type": "text/plain"}),
         415, "unsupported_media_type"),
        (httpx.post(f"{url}/detect", files=[("images", (None, "http://127.0.0.1/x.png"))]),
         422, "not_a_file"),
        (detect(url, [("image", ("a.png", encode(scenes[0].image, "PNG"), "image/png"))]), 422,
         "missing_input"),
        (detect(url, [upload(0, scenes[0]), ("mask", ("m.png", b"x", "image/png"))]), 422,
         "unexpected_part"),
        (detect(url, [upload(0, scenes[0])] * 33), 413, "too_many_images"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, (code, response.text)
        assert response.json()["error"] == code
    assert detect(url, [upload(0, scenes[0])]).status_code == 200, "and it still answers"
