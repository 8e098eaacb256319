"""decode_image: every common mode and format ends as uint8 pixels of the model's input shape."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.contract import InputSpec
from serving.preprocess import (
    ImageTooLarge,
    InvalidImage,
    InvalidTensor,
    decode_image,
    validate_tensor,
)

GREY = InputSpec(height=28, width=28, channels=1, color_mode="L", polarity="light_on_dark",
                 mean=(0.13,), std=(0.28,))
RGB = InputSpec(height=32, width=24, channels=3, color_mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def half_white(mode: str, size=(40, 40)) -> Image.Image:
    """Left half black, right half white, in the given mode."""
    grey = np.zeros(size[::-1], dtype=np.uint8)
    grey[:, size[0] // 2:] = 255
    return Image.fromarray(grey, mode="L").convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "1", "LA", "I", "F"])
@pytest.mark.parametrize("spec", [GREY, RGB], ids=["grey", "rgb"])
def test_every_mode_becomes_the_model_input(mode: str, spec: InputSpec) -> None:
    fmt = {"CMYK": "JPEG", "I": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    pixels = decode_image(encode(half_white(mode), fmt), spec)
    assert pixels.shape == spec.shape and pixels.dtype == np.uint8
    assert pixels[:, : spec.width // 4].max() < 40, f"{mode}: left half should stay dark"
    assert pixels[:, -spec.width // 4:].min() > 215, f"{mode}: right half should stay bright"


def test_16_bit_png_is_scaled_not_clipped() -> None:
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    image = Image.fromarray(ramp)  # mode I;16
    assert image.mode.startswith("I;16")
    pixels = decode_image(encode(image, "PNG"), InputSpec(**{**GREY.model_dump(), "height": 8,
                                                            "width": 8, "resize": "nearest"}))
    expected = np.rint(ramp.astype(np.float64) * 255 / 65535)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1


def test_transparency_is_flattened_onto_the_trained_background() -> None:
    transparent = Image.new("RGBA", (10, 10), (255, 255, 255, 0))
    assert decode_image(encode(transparent, "PNG"), GREY).max() == 0, "light_on_dark: black"
    assert decode_image(encode(transparent, "PNG"), RGB).min() == 255, "natural: white"


def test_palette_with_transparency() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 255, 255] * 256)
    image.info["transparency"] = 0
    assert decode_image(encode(image, "PNG", transparency=0), GREY).max() == 0


def test_exif_orientation_is_applied() -> None:
    image = half_white("RGB", size=(40, 20))  # wide: dark left, bright right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is tall, bright at bottom
    pixels = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95), GREY)[..., 0]
    assert pixels[:10].mean() < 40 and pixels[-10:].mean() > 215


@pytest.mark.parametrize("size", [(1, 1), (2000, 3), (3, 900), (28, 28), (640, 480)])
def test_any_size_is_resized(size: tuple[int, int]) -> None:
    assert decode_image(encode(Image.new("L", size, 128), "PNG"), GREY).shape == (28, 28, 1)


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("L", (20, 20), 255), Image.new("L", (20, 20), 0)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue(), GREY).min() > 200


def test_file_path_input(tmp_path) -> None:
    path = tmp_path / "digit.png"
    half_white("L").save(path)
    assert decode_image(path, GREY).shape == (28, 28, 1)


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"%PDF-1.7 not an image", "not an image"),
        (encode(Image.new("RGB", (64, 64)), "JPEG")[:200], "could not decode"),
        (encode(Image.new("RGB", (64, 64), "red"), "PNG")[:-30], "could not decode"),
    ],
    ids=["empty", "pdf", "truncated-jpeg", "truncated-png"],
)
def test_broken_uploads_raise_a_clear_error(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidImage, match=reason):
        decode_image(payload, GREY)


@pytest.mark.parametrize(
    "array",
    [np.zeros((2, 28, 28)), np.zeros((2, 28, 28, 1), dtype=np.int64), np.full((1, 28, 28), 255.0)],
    ids=["NHW", "NHWC-int", "NHW-float-whole"],
)
def test_tensor_of_either_layout_becomes_uint8_nhwc(array: np.ndarray) -> None:
    pixels = validate_tensor(array, GREY)
    assert pixels.shape == (len(array), 28, 28, 1) and pixels.dtype == np.uint8
    assert pixels.max() == array.max()


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.zeros((2, 8, 8)), r"expects \(N, 28, 28\) or \(N, 28, 28, 1\)"),
        (np.zeros((28, 28)), "expects"),
        (np.zeros((0, 28, 28)), "non-empty"),
        (np.full((1, 28, 28), -1), "from 0 to 255"),
        (np.full((1, 28, 28), np.nan), "finite"),
        (np.full((1, 28, 28), 0.5), "whole numbers"),
        (np.array(["a"]), "numbers 0-255"),
    ],
)
def test_bad_tensors_name_what_is_expected(array: np.ndarray, reason: str) -> None:
    with pytest.raises(InvalidTensor, match=reason):
        validate_tensor(array, GREY)


def test_rgb_model_expects_three_channels() -> None:
    with pytest.raises(InvalidTensor, match=r"expects \(N, 32, 24, 3\)$"):
        validate_tensor(np.zeros((1, 32, 24)), RGB)


def test_images_over_the_pixel_limit_are_refused_before_decoding() -> None:
    data = encode(Image.new("L", (300, 200)), "PNG")
    assert decode_image(data, GREY, max_pixels=60_000).shape == (28, 28, 1)
    with pytest.raises(ImageTooLarge, match="300x200 = 60000 pixels, over the limit of 59999"):
        decode_image(data, GREY, max_pixels=59_999)
