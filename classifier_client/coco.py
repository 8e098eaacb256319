"""A detector's answers for a folder as COCO results, which pycocotools' `COCO.loadRes` and
`COCOeval` read, and an images index beside them; FORMAT says what is written (`folder --help`
shows it)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = """\
  results.json         a list of {"image_id", "file_name", "category_id", "bbox": [x, y, w, h],
                       "score"}, one per detection, by image id and then best first
  results.images.json  {"images": [{"id", "file_name", "width", "height"}], "categories":
                       [{"id", "name"}], "info": {"model", "folder", "thresholds"}}: a COCO
                       dataset without annotations, every image answered (with or without
                       detections); COCO("results.images.json").loadRes("results.json") loads
                       the pair
  image_id             1-based position of the file in sorted path order among all images found
                       under the folder (a file that failed keeps its number, the others' stay)
  file_name            the path relative to the folder
  category_id          class id + 1 (COCO's ids start at 1), named in "categories" by the
                       model's labels, as train_export's own COCO evaluation numbers them
"""


@dataclass(frozen=True)
class Answered:
    """One image's answer from the detector, and where the image is."""

    image_id: int
    file_name: str  # relative to the folder, with "/" separators
    answer: Mapping[str, Any]  # the service's per-image answer: detections, width, height, model


def image_ids(paths: Sequence[Path], folder: Path) -> dict[Path, tuple[int, str]]:
    """Each image's id (1-based, in sorted path order) and its file name relative to `folder`."""
    return {path: (i, path.relative_to(folder).as_posix())
            for i, path in enumerate(sorted(paths), start=1)}


def coco_results(answered: Sequence[Answered]) -> list[dict[str, Any]]:
    """The detections as COCO results: boxes [x1, y1, x2, y2] become [x, y, width, height]."""
    results = []
    for image in sorted(answered, key=lambda a: a.image_id):
        for detection in image.answer["detections"]:
            x1, y1, x2, y2 = (float(v) for v in detection["box"])
            results.append({"image_id": image.image_id, "file_name": image.file_name,
                            "category_id": int(detection["class_id"]) + 1,
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2),
                                     round(y2 - y1, 2)],
                            "score": round(float(detection["score"]), 6)})
    return results


def images_index(answered: Sequence[Answered], labels: Sequence[str],
                 info: Mapping[str, Any]) -> dict[str, Any]:
    return {"info": dict(info),
            "images": [{"id": a.image_id, "file_name": a.file_name,
                        "width": int(a.answer["width"]), "height": int(a.answer["height"])}
                       for a in sorted(answered, key=lambda a: a.image_id)],
            "categories": [{"id": c + 1, "name": label} for c, label in enumerate(labels)]}


def index_path(out: Path) -> Path:
    """results.json -> results.images.json"""
    return out.with_name(f"{out.stem}.images.json")


def check_out(out: Path) -> None:
    if out.suffix != ".json":
        raise SystemExit(f"a detector's results are COCO JSON: --out must end in .json, not "
                         f"{out.name!r} (CSV and JSON Lines rows are a classifier's)")


def write_coco(out: Path, answered: Sequence[Answered], labels: Sequence[str],
               info: Mapping[str, Any]) -> None:
    """`out` (the results) and its images index, each written whole, then moved into place."""
    write_json(out, coco_results(answered))
    write_json(index_path(out), images_index(answered, labels, info))


def write_json(path: Path, value: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=None) + "\n")
    os.replace(partial, path)
