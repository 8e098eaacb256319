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
    kind: str          # "light" or "heavy", as the targets call them
    export_args: tuple[str, ...]


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
}


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
