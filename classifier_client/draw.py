"""Detections drawn on the image they were made on: a box and a label ("7: 0.93") per detection,
one colour per class, on the upload's own pixels after its EXIF rotation (the pixels the
service's boxes are given in), saved as PNG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

# matplotlib's "tab10" (Tableau 10): ten colours told apart at a glance, also by most people with
# a colour vision deficiency; class c gets PALETTE[c % 10].
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def colour_of(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def open_upright(path: Path) -> Image.Image:
    """The image as the service saw it: first frame, EXIF orientation applied, RGB (transparent
    parts on white)."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
    if image.mode in ("RGBA", "LA", "PA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def draw_detections(image: Image.Image, detections: Sequence[Mapping[str, Any]]) -> Image.Image:
    """A copy of `image` (RGB) with each detection's box and label; the best detection is drawn
    last, so that its label stays readable where labels overlap."""
    drawn = image.convert("RGB")
    shorter = min(drawn.size)
    line = max(1, round(shorter / 150))
    font = ImageFont.load_default(size=max(10, min(28, round(shorter / 18))))
    canvas = ImageDraw.Draw(drawn)
    for detection in sorted(detections, key=lambda d: d["score"]):
        colour = colour_of(int(detection["class_id"]))
        x1, y1, x2, y2 = detection["box"]
        canvas.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        label_at(canvas, f"{detection['label']}: {detection['score']:.2f}", (x1, y1), colour, font,
                 drawn.size)
    return drawn


def label_at(canvas: ImageDraw.ImageDraw, text: str, corner: tuple[float, float],
             colour: tuple[int, int, int], font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
             size: tuple[int, int]) -> None:
    """`text` on a filled tag of `colour` just above the box's top-left corner (inside the box
    when there is no room above), kept within the image."""
    left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
    width, height = right - left + 4, bottom - top + 2
    x = min(max(0.0, corner[0]), max(0.0, size[0] - width))
    y = corner[1] - height if corner[1] >= height else corner[1]
    canvas.rectangle((x, y, x + width - 1, y + height - 1), fill=colour)
    ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150 else \
        (255, 255, 255)
    canvas.text((x + 2 - left, y + 1 - top), text, fill=ink, font=font)


def draw_file(path: Path, answer: Mapping[str, Any], out_dir: Path) -> Path:
    """`path` with `answer`'s detections drawn, saved as `<out_dir>/<stem>.boxes.png`."""
    image = open_upright(path)
    if image.size != (answer["width"], answer["height"]):
        raise ValueError(f"{path} is {image.size[0]}x{image.size[1]} upright, but the answer is "
                         f"for {answer['width']}x{answer['height']}: was the file changed?")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{path.stem}.boxes.png"
    draw_detections(image, answer["detections"]).save(target, optimize=True)
    return target
