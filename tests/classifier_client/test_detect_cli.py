"""python -m classifier_client against a real ObjectDetector: `detect --draw`, `folder` writing
COCO results that pycocotools scores against held-out scenes' ground truth, and `offline` giving
the same detections from the model store."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier_client.draw import colour_of
from tests.helpers import python

pytestmark = pytest.mark.e2e

SCENES = 100
MIN_MAP_50 = 0.85  # the card's held-out mAP@0.5 is >= 0.90 over 500 scenes; 100 vary more
COCO_THRESHOLD = "0.05"  # what COCO evaluation wants (train_export's evaluation uses it)


def cli(*args: str):
    return python("-m", "classifier_client", *args, timeout=300)


@pytest.fixture(scope="module")
def scenes():
    from train_export.detection.scenes import heldout_scenes

    return heldout_scenes(SCENES)


@pytest.fixture(scope="module")
def scene_folder(scenes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out scenes, PNG and JPEG in turn, named so that sorted order is scene order (image
    id i + 1 is scene i, as in coco_ground_truth); and, sorted last, one file that is not an
    image."""
    folder = tmp_path_factory.mktemp("scenes")
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(folder / f"scene_{i:03d}.{'png' if i % 2 else 'jpg'}",
                                          quality=95)
    (folder / "zz-notes.png").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def served(detector_server, scene_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("served") / "results.json"
    result = cli("folder", str(scene_folder), "--url", detector_server.url, "--out", str(out),
                 "--confidence-threshold", COCO_THRESHOLD)
    assert result.returncode == 1, "the file that is not an image makes the exit status 1"
    assert f"{SCENES} answered, 1 failed" in result.stdout, result.stdout + result.stderr
    return out


def test_detect_draws_boxes_on_a_scene(detector_server, scenes, tmp_path) -> None:
    scene = scenes[3]
    path = tmp_path / "scene.png"
    Image.fromarray(scene.image).save(path)
    result = cli("detect", str(path), "--url", detector_server.url, "--draw",
                 str(tmp_path / "drawn"))
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["path"] == str(path)
    assert (line["width"], line["height"]) == (scene.width, scene.height)
    assert line["detections"], "the scene's digits are found at the default thresholds"

    with Image.open(tmp_path / "drawn" / "scene.boxes.png") as drawn:
        assert drawn.format == "PNG" and drawn.size == (scene.width, scene.height)
        pixels = np.asarray(drawn.convert("RGB"))
    changed = (pixels != scene.image).any(axis=2)
    assert changed.any() and changed.mean() < 0.5, "boxes and labels drawn, the scene kept"
    best = line["detections"][0]
    x1, y1, x2, y2 = (round(v) for v in best["box"])
    left_edge = pixels[(y1 + y2) // 2, max(0, x1 - 1):x1 + 2]
    assert (left_edge == colour_of(best["class_id"])).all(axis=1).any(), \
        f"the best box's left edge at x={x1} is drawn in its class colour"


def test_folder_writes_coco_results_that_score_on_held_out_scenes(served, scenes) -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from train_export.detection.evaluate import coco_ground_truth

    index = json.loads(served.with_name("results.images.json").read_text())
    assert [image["id"] for image in index["images"]] == list(range(1, SCENES + 1))
    assert index["images"][4] == {"id": 5, "file_name": "scene_004.jpg",
                                  "width": scenes[4].width, "height": scenes[4].height}
    failed = [json.loads(line) for line in served.with_name("results.json.failed.jsonl").open()]
    assert [Path(f["path"]).name for f in failed] == ["zz-notes.png"]
    assert failed[0]["error"].startswith("invalid_image")

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        truth = COCO()
        truth.dataset = coco_ground_truth(scenes)
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(str(served)), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[1] >= MIN_MAP_50, \
        f"mAP@0.5 of the served answers is {evaluation.stats[1]:.3f} on {SCENES} scenes"


def test_offline_gives_the_served_detections(served, scene_folder, trained_detector,
                                             tmp_path) -> None:
    out = tmp_path / "offline.json"
    result = cli("offline", str(scene_folder), "--model", trained_detector, "--out", str(out),
                 "--confidence-threshold", COCO_THRESHOLD)
    assert result.returncode == 1 and f"{SCENES} answered, 1 failed" in result.stdout, \
        result.stdout + result.stderr
    served_results, offline_results = json.loads(served.read_text()), json.loads(out.read_text())
    assert len(offline_results) == len(served_results) > SCENES

    def in_order(results: list[dict]) -> list[dict]:  # equal scores may come in either order
        return sorted(results, key=lambda r: (r["image_id"], r["category_id"], r["bbox"]))

    def key(r: dict) -> tuple:
        return r["image_id"], r["category_id"], r["file_name"]

    for mine, theirs in zip(in_order(offline_results), in_order(served_results)):
        assert key(mine) == key(theirs)
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert mine["bbox"] == pytest.approx(theirs["bbox"], abs=0.02)
    served_index = json.loads(served.with_name("results.images.json").read_text())
    offline_index = json.loads(tmp_path.joinpath("offline.images.json").read_text())
    assert offline_index["images"] == served_index["images"]
    assert offline_index["info"]["thresholds"] == served_index["info"]["thresholds"]
