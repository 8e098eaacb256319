"""Detection scenes keep the composition rules: canvas sizes and aspect, digit count and size,
occlusion, boxes inside the canvas and on the ink, held-out sources disjoint, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from train_export.detection.scenes import (
    BACKGROUNDS,
    LABELS,
    SceneRules,
    heldout_scenes,
    source_digits,
    split_sources,
    training_scenes,
)

RULES = SceneRules()


@pytest.fixture(scope="module")
def scenes():
    return training_scenes(300, seed=0)


def test_canvas_sizes_and_aspect(scenes) -> None:
    for scene in scenes:
        assert scene.image.dtype == np.uint8 and scene.image.shape[2] == 3
        longer, shorter = max(scene.width, scene.height), min(scene.width, scene.height)
        assert RULES.min_side <= shorter <= longer <= RULES.max_side
        assert longer / shorter <= RULES.max_aspect
    # Both orientations, the whole size range and all background kinds occur.
    assert any(s.width > s.height for s in scenes) and any(s.height > s.width for s in scenes)
    assert min(min(s.width, s.height) for s in scenes) < 100
    assert max(max(s.width, s.height) for s in scenes) > 450
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def test_digit_count_and_size(scenes) -> None:
    counts = [len(s.boxes) for s in scenes]
    assert min(counts) >= RULES.min_digits and max(counts) <= RULES.max_digits
    assert set(counts) == set(range(1, 9))  # every count occurs
    for scene in scenes:
        shorter = min(scene.width, scene.height)
        fraction = scene.cell_sizes / shorter
        assert (fraction >= RULES.min_digit_fraction).all()
        assert (fraction <= RULES.max_digit_fraction).all()
        assert len(scene.boxes) == len(scene.class_ids) == len(scene.cell_sizes)


def test_occlusion_under_limit(scenes) -> None:
    occlusion = np.concatenate([s.occlusion for s in scenes])
    assert (occlusion >= 0).all() and (occlusion < RULES.max_occlusion).all()
    assert occlusion.max() > 0.1  # digits do overlap, not only touch


def test_boxes_inside_canvas_and_on_the_ink(scenes) -> None:
    for scene in scenes:
        boxes = scene.boxes
        assert boxes.dtype == np.float32 and boxes.shape == (len(scene.class_ids), 4)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= scene.width).all() and (boxes[:, 3] <= scene.height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        # A box lies within its digit's cell, and is whole pixels (pixel-edge convention).
        assert (boxes[:, 2] - boxes[:, 0] <= scene.cell_sizes).all()
        assert (boxes[:, 3] - boxes[:, 1] <= scene.cell_sizes).all()
        np.testing.assert_array_equal(boxes, np.round(boxes))


def test_a_lone_digit_box_is_where_its_ink_differs_from_the_background() -> None:
    """One digit on a plain background: its box is the tight box of the changed pixels, give
    or take the faint ink under the 0.5 threshold."""
    scene = next(s for s in training_scenes(200, seed=3)
                 if len(s.boxes) == 1 and s.background == "plain")
    background = scene.image[0, 0].astype(int)
    changed = np.abs(scene.image.astype(int) - background).sum(axis=2) > 0
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    x1, y1, x2, y2 = scene.boxes[0]
    assert cols[0] <= x1 and x2 <= cols[-1] + 1 and rows[0] <= y1 and y2 <= rows[-1] + 1
    assert x1 - cols[0] <= 0.2 * scene.cell_sizes[0] and y1 - rows[0] <= 0.2 * scene.cell_sizes[0]


def test_labels_are_the_source_digits_labels(scenes) -> None:
    _, labels = source_digits()
    for scene in scenes:
        np.testing.assert_array_equal(scene.class_ids, labels[scene.source_ids])
    assert [str(d) for d in range(10)] == LABELS


def test_heldout_sources_are_disjoint_from_training_sources(scenes) -> None:
    split = split_sources(seed=0)
    _, labels = source_digits()
    assert not set(split.train_ids) & set(split.heldout_ids)
    assert len(split.train_ids) + len(split.heldout_ids) == len(labels)
    # Stratified: every class held out in about the same share.
    shares = np.bincount(labels[split.heldout_ids], minlength=10) / np.bincount(labels)
    assert shares.min() > 0.17 and shares.max() < 0.23
    heldout = heldout_scenes(100, seed=0)
    used_in_training = set(np.concatenate([s.source_ids for s in scenes]))
    used_heldout = set(np.concatenate([s.source_ids for s in heldout]))
    assert used_in_training <= set(split.train_ids)
    assert used_heldout <= set(split.heldout_ids)


def test_deterministic_for_a_seed() -> None:
    first, again, other = training_scenes(5, seed=7), training_scenes(5, seed=7), \
        training_scenes(5, seed=8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert any(a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
               for a, c in zip(first, other))
    # Held-out scenes are their own stream, not the training scenes with other digits.
    assert heldout_scenes(1, seed=7)[0].image.shape != first[0].image.shape or \
        not np.array_equal(heldout_scenes(1, seed=7)[0].image, first[0].image)
