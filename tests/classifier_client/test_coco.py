"""The COCO writer: image ids by sorted path, boxes as [x, y, w, h], category ids = class + 1,
an images index beside the results; pycocotools loads and scores what it writes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from classifier_client.coco import Answered, check_out, coco_results, image_ids, write_coco

LABELS = [str(d) for d in range(10)]


def answer(*detections: tuple[int, float, list[float]], size: tuple[int, int] = (200, 100)
           ) -> dict:
    return {"detections": [{"label": str(c), "class_id": c, "score": s, "box": b}
                           for c, s, b in detections],
            "width": size[0], "height": size[1], "model": "digits-detector:test"}


def quietly(call, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return call(*args)


def test_image_ids_are_sorted_path_positions_from_one(tmp_path: Path) -> None:
    paths = [tmp_path / "b.png", tmp_path / "a" / "z.jpg", tmp_path / "a.png"]
    assert image_ids(paths, tmp_path) == {tmp_path / "a" / "z.jpg": (1, "a/z.jpg"),
                                          tmp_path / "a.png": (2, "a.png"),
                                          tmp_path / "b.png": (3, "b.png")}


def test_results_are_coco_boxes_by_image_then_score() -> None:
    answered = [Answered(2, "b.png", answer((0, 0.5, [1, 2, 11, 22]))),
                Answered(1, "a.png", answer((7, 0.9, [10.5, 20.25, 40.75, 60]),
                                            (9, 0.123456789, [0, 0, 5, 5])))]
    assert coco_results(answered) == [
        {"image_id": 1, "file_name": "a.png", "category_id": 8,
         "bbox": [10.5, 20.25, 30.25, 39.75], "score": 0.9},
        {"image_id": 1, "file_name": "a.png", "category_id": 10, "bbox": [0, 0, 5, 5],
         "score": 0.123457},
        {"image_id": 2, "file_name": "b.png", "category_id": 1, "bbox": [1, 2, 10, 20],
         "score": 0.5},
    ]


def test_the_index_lists_every_image_answered_and_the_labels(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    write_coco(out, [Answered(1, "empty.png", answer(size=(64, 48))),
                     Answered(3, "one.png", answer((4, 0.8, [1, 1, 9, 9])))],
               LABELS, {"model": "digits-detector:test"})
    index = json.loads((tmp_path / "results.images.json").read_text())
    assert index["images"] == [{"id": 1, "file_name": "empty.png", "width": 64, "height": 48},
                               {"id": 3, "file_name": "one.png", "width": 200, "height": 100}]
    assert index["categories"][0] == {"id": 1, "name": "0"} and len(index["categories"]) == 10
    assert index["info"] == {"model": "digits-detector:test"}
    assert [r["image_id"] for r in json.loads(out.read_text())] == [3]
    assert not list(tmp_path.glob("*.partial")), "files are moved into place whole"


def test_pycocotools_loads_the_pair_and_scores_perfect_detections_as_one(tmp_path: Path
                                                                         ) -> None:
    """Detections equal to the ground truth score mAP 1.0: the box and id conventions are
    COCO's."""
    answered = [Answered(1, "a.png", answer((3, 0.9, [10, 20, 50, 80]), (5, 0.8, [60, 5, 90, 40]))),
                Answered(2, "b.png", answer((3, 0.7, [0, 0, 30, 30])))]
    out = tmp_path / "results.json"
    write_coco(out, answered, LABELS, {})
    truth = quietly(COCO, str(tmp_path / "results.images.json"))
    truth.dataset["annotations"] = [
        {"id": i + 1, "image_id": r["image_id"], "category_id": r["category_id"],
         "bbox": r["bbox"], "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0}
        for i, r in enumerate(json.loads(out.read_text()))]
    quietly(truth.createIndex)
    predicted = quietly(truth.loadRes, str(out))
    evaluation = COCOeval(truth, predicted, iouType="bbox")
    quietly(evaluation.evaluate)
    quietly(evaluation.accumulate)
    quietly(evaluation.summarize)
    assert evaluation.stats[1] == pytest.approx(1.0), "mAP@0.5"
    assert evaluation.stats[0] == pytest.approx(1.0), "mAP@[.5:.95]"


def test_a_detector_writes_json_only() -> None:
    check_out(Path("results.json"))
    with pytest.raises(SystemExit, match="--out must end in .json, not 'preds.csv'"):
        check_out(Path("preds.csv"))
