"""What every benchmark run uses: the same upload images and the same exported models."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


@dataclass(frozen=True)
class BenchModel:
    key: str           # short name used in tables
    name: str          # BentoML store name
    kind: str          # "light", "heavy", "detector", ...: as the targets call them
    export_args: tuple[str, ...]
    task: str = "classification"  # or "detection": served by service:ObjectDetector on /detect


MODELS = {
    "digits": BenchModel("digits", "digits-classifier", "default", ()),
    "mobilenet_v3_small": BenchModel(
        "mobilenet_v3_small", "bench-mobilenet-v3-small-224", "light",
        ("--architecture", "mobilenet_v3_small", "--input-size", "224", "--epochs", "0")),
    "resnet18": BenchModel(
        "resnet18", "bench-resnet18-224", "heavy",
        ("--architecture", "resnet18", "--input-size", "224", "--epochs", "0")),
    "resnet50": BenchModel(
        "resnet50", "bench-resnet50-224", "gpu",
        ("--architecture", "resnet50", "--input-size", "224", "--epochs", "0")),
    # The default detector, trained as shipped (3-5 min on 2 cores) when the store has none.
    "detector": BenchModel("detector", "digits-detector", "detector", ("--task", "detection"),
                           task="detection"),
}

# The detector's upload: a composed scene of this size with this many held-out digits.
SCENE_SIZE = (320, 240)
SCENE_DIGITS = 6
SCENE_SEED = 0


def photo_like(size: tuple[int, int] = (640, 480), seed: int = 0) -> Image.Image:
    """A deterministic stand-in for a phone photo: smooth colour fields, shapes, sensor noise.
    JPEG-compresses like a photo (tens of kB at 640x480), unlike flat or random images."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    field = np.stack([np.sin(6 * x + 2 * y + p) for p in rng.uniform(0, 6, 3)], axis=-1)
    image = Image.fromarray(((field * 0.5 + 0.5) * 200 + 20).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)]
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def write_images(directory: Path) -> dict[str, Path]:
    """The uploads: a 640x480 JPEG (quality 85) and the same picture as PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    image = photo_like()
    paths = {"jpeg": directory / "photo-640x480.jpg", "png": directory / "photo-640x480.png"}
    image.save(paths["jpeg"], quality=85)
    image.save(paths["png"])
    return paths


@dataclass(frozen=True)
class BenchScene:
    """The detector's upload, as files, and what is in it."""

    paths: dict[str, Path]  # "png" (the one sent under load) and "jpeg" (decode cost only)
    width: int
    height: int
    background: str
    boxes: list[list[float]]  # x1, y1, x2, y2 of each digit's ink (alpha >= 0.5), pixel edges
    labels: list[int]


def compose_bench_scene(size: tuple[int, int] = SCENE_SIZE, digits: int = SCENE_DIGITS,
                        seed: int = SCENE_SEED) -> tuple[Image.Image, str, list, list]:
    """A fixed scene, from train_export.detection.scenes' own pieces: its background and inks
    and held-out source digits (never seen in training), one digit per cell of a grid (3 x 2 for
    6), each 25-35% of the shorter side, jittered inside its cell so none overlap. A pure
    function of its arguments. Returns (image, background kind, boxes, class ids)."""
    from train_export.detection.scenes import (
        SceneRules,
        digit_alpha,
        draw_background,
        ink_colour,
        scene_rng,
        source_digits,
        split_sources,
        to_rgb8,
    )

    rules = SceneRules()
    rng = scene_rng(seed, 99, 0)  # a stream of its own, apart from training and held-out ones
    width, height = size
    canvas, kind, dark = draw_background(rng, width, height, rules)
    alphas, labels = source_digits()
    heldout = split_sources(seed).heldout_ids
    columns = (digits + 1) // 2
    rows = 2 if digits > 1 else 1
    cell_w, cell_h = width // columns, height // rows
    boxes, classes = [], []
    for i in range(digits):
        source = int(heldout[rng.integers(len(heldout))])
        side = int(round(rng.uniform(0.25, 0.35) * min(width, height)))
        side = min(side, cell_w, cell_h)
        alpha = digit_alpha(alphas[source], side)
        x = (i % columns) * cell_w + int(rng.integers(cell_w - side + 1))
        y = (i // columns) * cell_h + int(rng.integers(cell_h - side + 1))
        mask = Image.fromarray((alpha * 255.0 + 0.5).astype(np.uint8))
        canvas.paste(to_rgb8(ink_colour(rng, dark, rules)), (x, y), mask)
        ink = alpha >= rules.ink_threshold
        ys, xs = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        boxes.append([float(x + xs[0]), float(y + ys[0]), float(x + xs[-1] + 1),
                      float(y + ys[-1] + 1)])
        classes.append(int(labels[source]))
    return canvas, kind, boxes, classes


def write_scene(directory: Path) -> BenchScene:
    """The detector's upload: the bench scene as PNG (sent under load) and JPEG (quality 85)."""
    directory.mkdir(parents=True, exist_ok=True)
    image, kind, boxes, classes = compose_bench_scene()
    w, h = image.size
    paths = {"png": directory / f"scene-{w}x{h}.png", "jpeg": directory / f"scene-{w}x{h}.jpg"}
    image.save(paths["png"])
    image.save(paths["jpeg"], quality=85)
    return BenchScene(paths, w, h, kind, boxes, classes)


def default_bench_model() -> tuple[str, Path]:
    """The default digits model in the bench's own store (exported there on first use): its tag
    and directory. Sets BENTOML_HOME, so call it before anything imports bentoml."""
    from bench.__main__ import ROOT, WORK

    os.environ["BENTOML_HOME"] = str(WORK / "home")
    WORK.mkdir(parents=True, exist_ok=True)
    tag = ensure_model(MODELS["digits"], WORK / "home", ROOT)
    import bentoml

    return tag, Path(bentoml.models.get(tag).path)


def ensure_model(model: BenchModel, home: Path, root: Path) -> str:
    """Export `model` into the bench store through the project's CLI unless it is there."""
    env = {**os.environ, "BENTOML_HOME": str(home)}
    import bentoml  # BENTOML_HOME is set by the caller before this import

    try:
        return str(bentoml.models.get(f"{model.name}:latest").tag)
    except bentoml.exceptions.NotFound:
        pass
    command = [sys.executable, "-m", "train_export", "--name", model.name, "--examples-dir", "",
               *model.export_args]
    print(f"exporting {model.key}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=root, env=env, check=True)
    return str(bentoml.models.get(f"{model.name}:latest").tag)
