"""Upload -> decode -> preprocess: bytes of any common image format to the uint8 pixels the graph
takes (H, W, C at the model's input size). Scaling and normalization are in the graph, not here.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .contract import InputSpec
from .errors import RejectedInput

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class InvalidImage(RejectedInput):
    """The upload is not an image Pillow can decode; the message says what to send instead."""

    code = "invalid_image"


class ImageTooLarge(RejectedInput):
    """More pixels than the configured limit; refused from the header, before decoding."""

    code = "image_too_large"


class InvalidTensor(RejectedInput):
    """JSON pixels that do not fit the model's input; the message names the expected shape."""

    code = "invalid_tensor"


NOT_AN_IMAGE = (
    "the upload is not an image Pillow recognises; send a PNG, JPEG, GIF, BMP, TIFF or WebP file"
)
PIXEL_LIMIT_KEY = "services.ImageClassifier.image_classifier.limits.max_image_pixels"


@contextlib.contextmanager
def pillow_errors_as_invalid_image() -> Iterator[None]:
    """Pillow signals a bad upload with OSError (UnidentifiedImageError), SyntaxError,
    ValueError or DecompressionBombError (an Exception only); callers get one InvalidImage,
    a ValueError, which pydantic turns into a 4xx instead of letting it surface as a 500."""
    try:
        yield
    except RejectedInput:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"the image is too large to decode safely ({exc}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage(NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(
            f"could not decode the image ({exc}); send a complete PNG, JPEG, GIF, BMP, TIFF or "
            "WebP file"
        ) from None


def open_image(source: bytes | Path | BinaryIO) -> Image.Image:
    """Identify an upload by its bytes (not its name or declared type) and read its header
    only; pixels are decoded later, by decode_image, once the size is known to be allowed."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    if _is_empty(source):
        raise InvalidImage("the upload is empty (0 bytes); send an image file")
    with pillow_errors_as_invalid_image(), warnings.catch_warnings():
        # Pillow warns (DecompressionBombWarning) before it errors; the limit is ours to apply.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _is_empty(source: Path | BinaryIO) -> bool:
    if isinstance(source, Path):
        return source.stat().st_size == 0
    empty = source.read(1) == b""
    source.seek(0)
    return empty


def decode_image(
    source: bytes | Path | BinaryIO | Image.Image, spec: InputSpec, max_pixels: int | None = None
) -> np.ndarray:
    """Decode one upload (bytes, a file, or an opened image) and return pixels of shape
    `spec.shape`, dtype uint8. Images over `max_pixels` are refused from their header alone."""
    image, _ = upright_image(source, spec, (spec.width, spec.height), max_pixels)
    with pillow_errors_as_invalid_image():
        image = image.resize((spec.width, spec.height), _RESAMPLING[spec.resize])
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(spec.shape)


def upright_image(
    source: bytes | Path | BinaryIO | Image.Image, spec: InputSpec, size: tuple[int, int],
    max_pixels: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """An upload decoded in the model's colour mode, upright (EXIF orientation applied), at no
    less than `size` (width, height) where it was larger; and the upright size of the full image,
    which is what a detector's boxes are given in."""
    image = source if isinstance(source, Image.Image) else open_image(source)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(
            f"the image is {image.width}x{image.height} = {image.width * image.height} pixels, "
            f"over the limit of {max_pixels}: send a smaller image ({PIXEL_LIMIT_KEY})"
        )
    with pillow_errors_as_invalid_image():
        full_size = _upright_size(image)
        image.seek(0)  # animated GIF/PNG/WebP: the first frame
        # JPEG only: let libjpeg decode at a reduced scale that is still >= the target size;
        # the resize after this does the rest, so this is faster at no cost in quality.
        image.draft(spec.color_mode, size)
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when nothing to rotate
        return to_color_mode(image, spec), full_size


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied: 5-8 turn the image by 90 degrees."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def to_color_mode(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Any Pillow mode -> the model's colour mode ('L' or 'RGB')."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        # Palette images may carry transparency in their palette; expand it to an alpha band.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = _flatten_alpha(image, spec)
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)  # CMYK, YCbCr, LAB, 1, ... are converted by Pillow
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images: scale the full range to 0-255 instead of clipping."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I") and values.max(initial=0) > 255 else 255.0
    if image.mode == "F" and values.max(initial=0) <= 1.0:
        top = 1.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _flatten_alpha(image: Image.Image, spec: InputSpec) -> Image.Image:
    """Composite onto the background the model was trained on (black for light-on-dark ink)."""
    background = (0, 0, 0) if spec.polarity == "light_on_dark" else (255, 255, 255)
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def tensor_shapes(spec: InputSpec) -> str:
    """The shapes a JSON tensor may have for this model, as error messages and docs say them."""
    h, w, c = spec.shape
    return (f"(N, {h}, {w}) or " if c == 1 else "") + f"(N, {h}, {w}, {c})"


def validate_tensor(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """JSON pixels (N, H, W) or (N, H, W, C), whole numbers 0-255 -> uint8 (N, H, W, C)."""
    h, w, c = spec.shape
    expected = tensor_shapes(spec)
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise InvalidTensor(
            f"pixels must be a non-empty array of numbers 0-255 of shape {expected}")
    if array.ndim == 3 and c == 1:
        array = array[..., np.newaxis]
    if array.ndim != 4 or array.shape[1:] != (h, w, c):
        raise InvalidTensor(f"pixels has shape {tuple(array.shape)}; this model expects {expected}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise InvalidTensor("pixel values must be finite numbers from 0 to 255")
    if array.dtype.kind == "f" and not np.array_equal(array, np.rint(array)):
        raise InvalidTensor("pixel values must be whole numbers from 0 to 255 (uint8)")
    return array.astype(np.uint8)
