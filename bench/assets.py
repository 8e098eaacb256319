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
    upload: str = "jpeg-224"  # the image sent under load: a key of UPLOADS


MODELS = {
    "digits": BenchModel("digits", "digits-classifier", "default", (), upload="digit-png"),
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
    JPEG-compresses like a photo (tens of kB at 640x480), unlike flat or random images. The
    shapes scale with the picture (20-200 px at 640 wide), so a 12 MP one has the same
    composition; the blur and the noise stay per pixel, as a sensor's do."""
    rng = np.random.default_rng(seed)
    w, h = size
    scale = max(w, h) / 640
    # One channel at a time on broadcast axes: the same values as np.mgrid's, without a
    # (h, w, 3) float64 field (a 12 MP picture would need 1 GB of temporaries).
    y, x = np.arange(h)[:, None] / max(w, h), np.arange(w)[None, :] / max(w, h)
    image = Image.fromarray(np.stack(
        [((np.sin(6 * x + 2 * y + p) * 0.5 + 0.5) * 200 + 20).astype(np.uint8)
         for p in rng.uniform(0, 6, 3)], axis=-1), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + int(rng.integers(20, 200) * scale),
               y0 + int(rng.integers(20, 200) * scale)]
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    pixels = np.asarray(image, dtype=np.int16)
    rows = max(1, 2**20 // w)  # the noise in slices of rows: the same draws as one call
    for top in range(0, h, rows):
        noise = rng.normal(0, 6, (min(rows, h - top), w, 3)).astype(np.int16)
        pixels[top:top + rows] += noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# What each upload is, by key: its description and Content-Type. A classifier is sent the image
# of its input size (BenchModel.upload): a 224x224 JPEG for the 224 models, a 28x28 PNG digit for
# the digits model; the 640x480 photo measures the decode cost.
UPLOADS = {
    "jpeg-224": ("224x224 photo-like JPEG", "image/jpeg"),
    "digit-png": ("28x28 PNG of a handwritten digit (examples/digit_7_00.png)", "image/png"),
    "jpeg": ("640x480 photo-like JPEG", "image/jpeg"),
    "png": ("640x480 photo-like PNG", "image/png"),
}
DIGIT = Path(__file__).resolve().parent.parent / "examples" / "digit_7_00.png"


def write_images(directory: Path) -> dict[str, Path]:
    """The uploads (UPLOADS): a 640x480 JPEG (quality 85) and the same picture as PNG, a
    224x224 JPEG (quality 85), and the digit PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    image = photo_like()
    paths = {"jpeg": directory / "photo-640x480.jpg", "png": directory / "photo-640x480.png",
             "jpeg-224": directory / "photo-224x224.jpg", "digit-png": directory / DIGIT.name}
    image.save(paths["jpeg"], quality=85)
    image.save(paths["png"])
    photo_like((224, 224), seed=1).save(paths["jpeg-224"], quality=85)
    paths["digit-png"].write_bytes(DIGIT.read_bytes())
    return paths


def upload_of(key: str, images: dict[str, Path]) -> tuple[Path, str]:
    """The file and Content-Type a bench model is sent under load."""
    upload = MODELS[key].upload
    return images[upload], UPLOADS[upload][1]


WORDS = ("model", "image", "serve", "batch", "latency", "request", "worker", "queue", "the",
         "of", "a", "to", "throughput", "runtime", "decode", "upload", "label", "score", "and",
         "config", "limit", "export", "deploy", "metrics", "cache", "in", "is", "per", "GPU")


def screenshot_like(size: tuple[int, int] = (1920, 1080), seed: int = 0) -> Image.Image:
    """A deterministic stand-in for a screenshot of a web page: flat panels (title bar,
    sidebar, page, code block), antialiased text in lines, buttons, and one photo. What makes a
    screenshot PNG compress as it does: long runs of one colour, and sharp text edges."""
    from PIL import ImageFont

    rng = np.random.default_rng(seed)
    w, h = size
    image = Image.new("RGB", size, (250, 250, 252))
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    draw.rectangle([0, 0, w, 48], fill=(36, 41, 47))  # title bar
    draw.text((20, 14), "image-classifier - dashboard", fill=(230, 230, 230), font=font)
    sidebar = w // 6
    draw.rectangle([0, 48, sidebar, h], fill=(236, 238, 241))
    for i in range(24):  # navigation entries
        draw.text((20, 70 + 34 * i), " ".join(rng.choice(WORDS, 2)).title(), fill=(60, 60, 70),
                  font=small)

    def paragraph(x: int, y: int, width: int, lines: int, colour: tuple, face) -> int:
        for _ in range(lines):
            text, cursor = [], 0
            while cursor < width - 120:
                word = str(rng.choice(WORDS))
                text.append(word)
                cursor += 9 * (len(word) + 1)
            draw.text((x, y), " ".join(text), fill=colour, font=face)
            y += 24
        return y + 16

    x0, y = sidebar + 40, 80
    draw.text((x0, y), "How cost grows", fill=(20, 20, 30), font=ImageFont.load_default(size=30))
    y = paragraph(x0, y + 56, w - x0 - 560, 8, (40, 40, 48), font)
    photo = photo_like((480, 320), seed + 1)  # a picture in the page
    image.paste(photo, (w - 520, 110))
    for i in range(4):  # buttons
        colour = tuple(int(c) for c in rng.integers(40, 200, 3))
        draw.rounded_rectangle([x0 + 150 * i, y, x0 + 150 * i + 130, y + 36], 6, fill=colour)
        draw.text((x0 + 150 * i + 18, y + 9), str(rng.choice(WORDS)).upper(), fill="white",
                  font=small)
    y += 70
    draw.rectangle([x0, y, w - 40, y + 300], fill=(40, 44, 52))  # a code block
    paragraph(x0 + 20, y + 16, w - x0 - 80, 11, (152, 195, 121), small)
    y += 340
    while y < h - 40:
        y = paragraph(x0, y, w - x0 - 40, 5, (40, 40, 48), font)
    return image


@dataclass(frozen=True)
class CurveImage:
    """One upload of the image-size sweep (bench/curves.py)."""

    key: str
    label: str          # as the report names it
    path: Path
    content_type: str
    width: int
    height: int


def write_curve_images(directory: Path) -> dict[str, CurveImage]:
    """The uploads of the image-size sweep, smallest first: a 224x224 JPEG (a model's input
    size), the bench's 640x480 JPEG, a 12-megapixel phone photo (4000x3000 JPEG, quality 90),
    a 1920x1080 PNG screenshot. Deterministic; written each run (a few seconds)."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = [
        ("jpeg-224", "224x224 JPEG", "photo-224x224.jpg", "image/jpeg", (224, 224),
         lambda: photo_like((224, 224), seed=1), {"quality": 85}),
        ("jpeg-640x480", "640x480 JPEG", "photo-640x480.jpg", "image/jpeg", (640, 480),
         photo_like, {"quality": 85}),
        ("jpeg-12mp", "12 MP photo (4000x3000 JPEG)", "photo-4000x3000.jpg", "image/jpeg",
         (4000, 3000), lambda: photo_like((4000, 3000), seed=2), {"quality": 90}),
        ("png-screenshot", "1920x1080 PNG screenshot", "screenshot-1920x1080.png", "image/png",
         (1920, 1080), screenshot_like, {}),
    ]
    images = {}
    for key, label, name, content_type, (width, height), make, options in specs:
        path = directory / name
        make().save(path, **options)
        images[key] = CurveImage(key, label, path, content_type, width, height)
    return images


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
