"""Drawing detections: boxes in their class's colour on the upload's upright pixels, a label tag
per box, the image's size unchanged, PNG out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from classifier_client.draw import PALETTE, colour_of, draw_detections, draw_file

GREY = (200, 200, 200)


def detection(class_id: int, box: list[float], score: float = 0.9) -> dict:
    return {"label": str(class_id), "class_id": class_id, "score": score, "box": box}


def test_each_box_is_outlined_in_its_class_colour_on_its_edges() -> None:
    image = Image.new("RGB", (200, 120), GREY)
    drawn = np.asarray(draw_detections(image, [detection(3, [20, 40, 60, 100]),
                                               detection(7, [120, 30, 180, 90], 0.6)]))
    assert drawn.shape == (120, 200, 3), "the drawing keeps the image's size"
    # x2 and y2 are far edges: the box covers columns 20..59, its outline lies on them.
    for x, y in [(20, 70), (59, 70), (40, 99)]:
        assert tuple(drawn[y, x]) == colour_of(3), f"({x}, {y}) is on the 3's outline"
    assert tuple(drawn[60, 179]) == colour_of(7)
    assert tuple(drawn[70, 40]) == GREY, "inside a box the image is untouched"
    assert tuple(drawn[5, 100]) == GREY, "away from boxes and labels the image is untouched"


def test_a_label_tag_sits_above_the_box_or_inside_it_at_the_top_edge() -> None:
    image = Image.new("RGB", (200, 120), GREY)
    drawn = np.asarray(draw_detections(image, [detection(1, [20, 40, 60, 100]),
                                               detection(2, [100, 0, 160, 50])]))
    above = drawn[25:39, 20:40].reshape(-1, 3)
    assert (above == colour_of(1)).all(axis=1).mean() > 0.4, "the 1's tag is above its box"
    assert len(np.unique(above, axis=0)) > 1, "and the tag holds text"
    inside = drawn[2:12, 101:120].reshape(-1, 3)
    assert (inside == colour_of(2)).all(axis=1).mean() > 0.4, \
        "a box at the top edge gets its tag inside"


def test_classes_get_distinct_colours() -> None:
    assert len({colour_of(c) for c in range(len(PALETTE))}) == len(PALETTE)
    assert colour_of(13) == colour_of(3), "more classes than colours: the palette repeats"


def test_no_detections_leaves_the_pixels_as_they_were() -> None:
    image = Image.new("RGB", (64, 48), GREY)
    assert np.array_equal(np.asarray(draw_detections(image, [])), np.asarray(image))


def test_boxes_are_drawn_on_the_upright_image_of_a_rotated_jpeg(tmp_path: Path) -> None:
    """The service answers in the pixels after EXIF rotation: so is the drawing."""
    stored = Image.new("RGB", (160, 90), GREY)  # stored landscape ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... displayed portrait, turned 90 degrees clockwise
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    answer = {"width": 90, "height": 160, "detections": [detection(5, [10, 100, 50, 150])]}

    target = draw_file(path, answer, tmp_path / "drawn")

    assert target == tmp_path / "drawn" / "photo.boxes.png"
    with Image.open(target) as drawn:
        assert drawn.format == "PNG" and drawn.size == (90, 160)
        assert drawn.getpixel((10, 125)) == colour_of(5)


def test_an_answer_for_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    Image.new("RGB", (100, 80), GREY).save(path)
    with pytest.raises(ValueError, match="100x80 upright, but the answer is for 80x100"):
        draw_file(path, {"width": 80, "height": 100, "detections": []}, tmp_path)


def test_grey_and_transparent_images_are_drawn_in_colour(tmp_path: Path) -> None:
    path = tmp_path / "cutout.png"
    Image.new("LA", (40, 40), (0, 0)).save(path)  # fully transparent
    target = draw_file(path, {"width": 40, "height": 40,
                              "detections": [detection(0, [5, 20, 35, 38])]}, tmp_path)
    with Image.open(target) as drawn:
        assert drawn.mode == "RGB"
        assert drawn.getpixel((20, 30)) == (255, 255, 255), "transparency drawn on white"
        assert drawn.getpixel((5, 30)) == colour_of(0)
