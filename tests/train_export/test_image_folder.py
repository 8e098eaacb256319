"""`python -m train_export --data DIR`: the user's own images in an ImageFolder layout, trained,
exported with per-class accuracy in the card, and served."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from serving.contract import ModelCard
from tests.helpers import ROOT, python, saved_tag, start_server, write_config

pytestmark = pytest.mark.e2e  # every test here runs the training CLI or a server

CLASSES = ("circle", "square", "triangle")


def draw_shape(shape: str, rng: np.random.Generator) -> Image.Image:
    """A coloured shape at a random place and size on a random background, like a photo of one."""
    width, height = (int(v) for v in rng.integers(40, 120, 2))
    background = tuple(int(c) for c in rng.integers(150, 256, 3))
    image = Image.new("RGB", (width, height), background)
    side = int(min(width, height) * rng.uniform(0.5, 0.9))
    x0, y0 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    fill = tuple(int(c) for c in rng.integers(0, 110, 3))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([x0, y0, x0 + side, y0 + side], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=fill)
    else:
        draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def write_folder(root: Path, per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for shape in CLASSES:
        (root / shape).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            suffix = "png" if i % 2 else "jpg"
            draw_shape(shape, rng).save(root / shape / f"{i:03d}.{suffix}")
    return root


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = write_folder(tmp_path_factory.mktemp("shapes"), per_class=60, seed=0)
    (root / "circle" / "notes.txt").write_text("not an image")  # skipped, and said so
    result = python("-m", "train_export", "--data", str(root), "--name", "shapes",
                    "--input-size", "32", "--epochs", "12", "--examples-dir", "", timeout=600)
    assert result.returncode == 0, result.stderr
    return saved_tag(result.stdout), root


def test_the_card_has_the_folder_labels_and_per_class_accuracy(shapes_model) -> None:
    tag, root = shapes_model
    card = ModelCard.read(Path(bentoml.models.get(tag).path))
    assert card.labels == list(CLASSES)
    assert set(card.class_accuracy) == set(CLASSES)
    assert card.accuracy["holdout"] >= 0.85, card.accuracy
    assert card.input.color_mode == "L" and card.input.polarity == "natural"
    assert card.input.mean[0] > 0.4, "mean measured on the images (light backgrounds)"
    assert card.lineage.dataset == "image folder"
    assert card.lineage.data_dir == str(root.resolve())
    assert card.lineage.skipped_files == ["circle/notes.txt"]
    assert card.lineage.train_samples + card.lineage.holdout_samples == 180


def test_the_default_name_is_refused_for_a_folder(tmp_path) -> None:
    result = python("-m", "train_export", "--data", str(tmp_path))
    assert result.returncode != 0 and "give the model its own --name" in result.stderr


def test_a_folder_with_one_class_says_what_layout_to_use(tmp_path) -> None:
    draw_shape("circle", np.random.default_rng(0)).save(tmp_path / "a.png")
    (tmp_path / "only").mkdir()
    draw_shape("circle", np.random.default_rng(1)).save(tmp_path / "only" / "b.png")
    result = python("-m", "train_export", "--data", str(tmp_path), "--name", "one-class")
    assert result.returncode != 0 and "needs at least 2" in result.stderr


def test_the_folder_model_serves_new_images(shapes_model, tmp_path) -> None:
    tag, _ = shapes_model
    new = write_folder(tmp_path / "new", per_class=8, seed=99)  # never seen in training
    config = write_config(tmp_path / "shapes.yaml", {"model": {"tag": tag}}, workers=1)
    files = sorted(new.rglob("*.*"))
    with start_server(["service:ImageClassifier"], cwd=ROOT, log_dir=tmp_path,
                      env={**os.environ, "BENTOML_CONFIG": str(config)}) as server:
        response = httpx.post(f"{server.url}/classify", timeout=60,
                              files=[("images", (f.name, f.read_bytes())) for f in files])
        info = httpx.post(f"{server.url}/model_info", json={}).json()
    assert response.status_code == 200, response.text
    answers = response.json()
    correct = sum(a["label"] == f.parent.name for a, f in zip(answers, files))
    assert correct >= 0.8 * len(files), json.dumps([a["label"] for a in answers])
    assert {a["model"] for a in answers} == {tag}
    assert set(info["class_accuracy"]) == set(CLASSES)
